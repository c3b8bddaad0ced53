"""wschat: a WebSocket broadcast chat daemon for Twisted, and its command-line client."""

__version__ = "0.1.0"
