"""
Where the Redis bus connects: ``redis://`` URLs and channel names, as ``--redis`` and
``--channel`` take them. No Redis client is imported here, so option parsing needs none.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from wschat.wire import hostPort

DEFAULT_CHANNEL = "wschat"
DEFAULT_REDIS_PORT = 6379


@dataclass(frozen=True)
class RedisAddress:
    """Where the Redis server is, parsed from a ``redis://`` URL."""

    host: str
    port: int = DEFAULT_REDIS_PORT
    db: int = 0
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        # For log lines: never the password.
        user = f"{self.username or ''}:***@" if self.password is not None else ""
        return f"redis://{user}{hostPort(self.host, self.port)}/{self.db}"


def parseRedisURL(url: str) -> RedisAddress:
    """
    Parse ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``; raise ``ValueError`` with a reason.

    USER and PASSWORD may be percent-encoded; an IPv6 HOST goes in brackets.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{url!r} is not a valid URL: {e}") from None
    if parts.scheme != "redis":
        raise ValueError(f"{url!r}: only redis://HOST:PORT/DB URLs are supported")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: query strings and fragments are not supported")
    path = parts.path.lstrip("/")
    if path and (not path.isdigit() or not path.isascii()):
        raise ValueError(f"{url!r}: the database must be a number, not {path!r}")
    password = unquote(parts.password) if parts.password is not None else None
    username = unquote(parts.username) if parts.username else None
    if username is not None and password is None:
        # redis://secret@host is how redis-py spells a password alone; so do we.
        username, password = None, username
    return RedisAddress(
        host=parts.hostname,
        port=port if port is not None else DEFAULT_REDIS_PORT,
        db=int(path) if path else 0,
        username=username,
        password=password,
    )


def parseChannel(name: str) -> str:
    """Check a ``--channel`` name; raise ``ValueError`` for an empty one."""
    if not name:
        raise ValueError("the channel name must not be empty")
    return name
