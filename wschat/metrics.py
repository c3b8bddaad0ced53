"""
Prometheus metrics for one daemon: what its connections and its room did.

Each :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry` (never the
global one), so several daemons in one process, as in the tests, count apart. The room and the
protocol call the methods below; each is a counter or gauge update, made once per event or once
per broadcast (never once per recipient).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)

if TYPE_CHECKING:
    from wschat.history import History

__all__ = [
    "KNOWN_CLOSE_CODES",
    "Metrics",
    "OTHER_CODE",
    "closeCodeLabel",
    "REFUSED_BINARY",
    "REFUSED_RATE_LIMIT",
    "REFUSED_RELAY",
    "REFUSED_COMMAND",
]

#: Close codes that keep their own ``code`` label in ``wschat_connections_closed_total``: the
#: range RFC 6455 and the IANA registry give the protocol (1000-1015). A client may send any
#: code from 1000 to 4999, so the others all share the label :data:`OTHER_CODE`: one label
#: series per code a client makes up would let clients grow the exposition without bound.
KNOWN_CLOSE_CODES = frozenset(range(1000, 1016))

#: The ``code`` label of every close code outside :data:`KNOWN_CLOSE_CODES`.
OTHER_CODE = "other"


def closeCodeLabel(code: int | None) -> str:
    """The ``code`` label for a close code: the code, ``none`` (no code), or ``other``."""
    if code is None:
        return "none"
    return str(code) if code in KNOWN_CLOSE_CODES else OTHER_CODE


#: The ``reason`` labels of ``wschat_messages_refused_total``.
REFUSED_RATE_LIMIT = "rate limit"
REFUSED_BINARY = "binary"
REFUSED_RELAY = "relay unavailable"
REFUSED_COMMAND = "malformed command"


class Metrics:
    """
    The daemon's counters, and the registry ``/metrics`` exposes.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            # What the global registry has by default: process memory, CPU, file descriptors.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self._open = Gauge(
            "wschat_connections_open",
            "WebSocket connections open now.",
            registry=registry,
        )
        self._opened = Counter(
            "wschat_connections_opened",
            "WebSocket connections opened (handshake completed).",
            registry=registry,
        )
        self._closed = Counter(
            "wschat_connections_closed",
            "WebSocket connections closed, by close code "
            "(1006: dropped without a closing handshake; 'other': codes outside 1000-1015).",
            ["code"],
            registry=registry,
        )
        self._received = Counter(
            "wschat_messages_received",
            "Messages received from clients.",
            registry=registry,
        )
        self._broadcast = Counter(
            "wschat_messages_broadcast",
            "Messages relayed to the room.",
            registry=registry,
        )
        self._frames = Counter(
            "wschat_frames_delivered",
            "WebSocket messages handed to connections: relayed messages, greetings, "
            "join and leave events.",
            registry=registry,
        )
        self._bytes = Counter(
            "wschat_sent_bytes",
            "Payload bytes of the messages counted by wschat_frames_delivered_total.",
            registry=registry,
        )
        self._dropped = Counter(
            "wschat_clients_dropped",
            "Clients disconnected because their outgoing queue was full.",
            registry=registry,
        )
        self._duplicates = Counter(
            "wschat_messages_deduplicated",
            "Messages not relayed because a message with the same id was already relayed "
            "inside the history window (resends).",
            registry=registry,
        )
        self._historyMessages = Gauge(
            "wschat_history_messages",
            "Messages held in the history window.",
            registry=registry,
        )
        self._historyBytes = Gauge(
            "wschat_history_bytes",
            "Bytes held for the messages of the history window (payloads and cached frames).",
            registry=registry,
        )
        self._recoveries = Counter(
            "wschat_recoveries",
            "Clients that connected with since=: recovered everything they missed (true) "
            "or not (false: another epoch, or older than the window).",
            ["recovered"],
            registry=registry,
        )
        self._refused = Counter(
            "wschat_messages_refused",
            "Messages refused by a limit, by reason.",
            ["reason"],
            registry=registry,
        )

    # -- connections

    def connectionOpened(self) -> None:
        self._open.inc()
        self._opened.inc()

    def connectionClosed(self, code: int | None) -> None:
        """A connection that had opened is gone; ``code`` is the close code ``onClose`` saw."""
        self._open.dec()
        self._closed.labels(code=closeCodeLabel(code)).inc()

    # -- messages

    def messageReceived(self) -> None:
        self._received.inc()

    def messageBroadcast(self, frames: int, size: int) -> None:
        """One message went to the room as ``frames`` deliveries totalling ``size`` bytes."""
        self._broadcast.inc()
        self.delivered(frames, size)

    def delivered(self, frames: int, size: int) -> None:
        """``frames`` messages of ``size`` bytes in all were handed to connections."""
        self._frames.inc(frames)
        self._bytes.inc(size)

    # -- history

    def watchHistory(self, history: History) -> None:
        """Report ``history``'s size whenever metrics are read (nothing per message)."""
        self._historyMessages.set_function(lambda: len(history))
        self._historyBytes.set_function(lambda: history.bytes)

    def recovery(self, recovered: bool) -> None:
        """A client connected with ``since``; ``recovered`` says whether it got everything."""
        self._recoveries.labels(recovered="true" if recovered else "false").inc()

    def duplicateRefused(self) -> None:
        """A message was not relayed: its client-chosen id was already relayed."""
        self._duplicates.inc()

    # -- limits (called by the code that enforces them)

    def clientDropped(self) -> None:
        """A client was disconnected because its outgoing queue was full."""
        self._dropped.inc()

    def messageRefused(self, reason: str) -> None:
        """
        A message was refused; ``reason`` is one of the fixed labels :data:`REFUSED_RATE_LIMIT`,
        :data:`REFUSED_BINARY`, :data:`REFUSED_RELAY`, :data:`REFUSED_COMMAND`.
        """
        self._refused.labels(reason=reason).inc()
