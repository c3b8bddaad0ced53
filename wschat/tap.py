"""
Options and service wiring for ``twistd wschat``: parse the command line, build the service tree.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service, strports
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from wschat.limits import Limits, parseSize
from wschat.protocol import DEFAULT_WELCOME, ChatServerFactory
from wschat.wire import Format


def portDescription(port: int, interface: str) -> str:
    """
    The endpoint description for ``--port``/``--interface`` (``tcp:2000:interface=127.0.0.1``).
    """
    return f"tcp:{port}:interface={endpoints.quoteStringArgument(interface)}"


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port number (0-65535)")
    return port


def _byteSize(value: str) -> int:
    size = parseSize(value)
    if size < 1:
        raise ValueError(f"{value!r} must be at least 1 byte")
    return size


def _positiveSeconds(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:
        raise ValueError(f"{value!r} must be a number of seconds above 0")
    return seconds


def _secondsOrOff(value: str) -> float:
    seconds = float(value)
    if not seconds >= 0:
        raise ValueError(f"{value!r} must be a number of seconds, 0 or more")
    return seconds


def _messageRate(value: str) -> float:
    rate = float(value)
    if not 0 <= rate < float("inf"):
        raise ValueError(f"{value!r} must be a number of messages per second, 0 or more")
    return rate


def _limitOrOff(value: str) -> int:
    count = int(value)
    if count < 0:
        raise ValueError(f"{value!r} must be a whole number, 0 or more")
    return count


def _positiveCount(value: str) -> int:
    count = int(value)
    if count < 1:
        raise ValueError(f"{value!r} must be a whole number, 1 or more")
    return count


_defaults = Limits()

#: Resource limits (README: "Limits and hostile input"); each becomes a field of Limits.
LIMIT_PARAMETERS: list[list[Any]] = [
    [
        "max-queue",
        None,
        _defaults.maxQueue,
        "Bytes (64K, 1M...) a client may have waiting to be sent once its connection's "
        "buffer is full; past it the client is closed (1008) and dropped.",
        _byteSize,
    ],
    [
        "max-message-size",
        None,
        _defaults.maxMessageSize,
        "Largest frame or message (after decompression) a client may send; "
        "larger ones close the connection with 1009.",
        _byteSize,
    ],
    [
        "ping-interval",
        None,
        _defaults.pingInterval,
        "Seconds between pings to each client (0: no pings).",
        _secondsOrOff,
    ],
    [
        "ping-timeout",
        None,
        _defaults.pingTimeout,
        "Seconds to wait for a pong before dropping the client.",
        _positiveSeconds,
    ],
    [
        "handshake-timeout",
        None,
        _defaults.handshakeTimeout,
        "Seconds a client has to finish the opening handshake.",
        _positiveSeconds,
    ],
    [
        "rate-limit",
        None,
        _defaults.rateLimit,
        "Messages per second each client may send on average (0: unlimited); "
        "past it the client is closed (1008).",
        _messageRate,
    ],
    [
        "rate-burst",
        None,
        _defaults.rateBurst,
        "Messages a client may send at once before --rate-limit applies.",
        _positiveCount,
    ],
    [
        "max-connections",
        None,
        _defaults.maxConnections,
        "Connections in all (0: unlimited); past it handshakes get HTTP 503.",
        _limitOrOff,
    ],
    [
        "max-connections-per-ip",
        None,
        _defaults.maxConnectionsPerIp,
        "Connections from one IP address or IPv6 /64 (0: unlimited); past it HTTP 429.",
        _limitOrOff,
    ],
]


def limitsFromOptions(options: usage.Options) -> Limits:
    """The :class:`Limits` the command line asked for."""
    return Limits(
        maxQueue=options["max-queue"],
        maxMessageSize=options["max-message-size"],
        pingInterval=options["ping-interval"],
        pingTimeout=options["ping-timeout"],
        handshakeTimeout=options["handshake-timeout"],
        rateLimit=options["rate-limit"],
        rateBurst=options["rate-burst"],
        maxConnections=options["max-connections"],
        maxConnectionsPerIp=options["max-connections-per-ip"],
    )


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a WebSocket chat room: every message any client sends reaches every "
        "connected client, prefixed with the sender's address."
    )

    optParameters: list[list[Any]] = [
        ["port", "p", 2000, "TCP port to listen on (ignored when --listen is given).", _port],
        ["interface", "i", "127.0.0.1", "Interface to listen on (ignored with --listen)."],
        ["welcome", None, DEFAULT_WELCOME, "Greeting sent to each new client ('' for none)."],
        [
            "format",
            None,
            Format.PREFIXED.value,
            "'prefixed': relay text as '<ip>:<port>: <text>', refuse binary (1003); "
            "'raw': relay every message, text or binary, unchanged.",
        ],
    ]
    optParameters += LIMIT_PARAMETERS
    optFlags: list[list[str | None]] = [
        ["no-message-log", None, "Do not log message bodies (privacy, speed)."],
        [
            "compression",
            None,
            "Offer permessage-deflate compression (costs CPU and memory per client).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """
        Listen on a Twisted server endpoint description (tcp:2000:interface=0.0.0.0,
        tcp6:2000:interface=\\:\\:, unix:/run/wschat.sock,
        ssl:2443:privateKey=key.pem:certKey=cert.pem).
        Repeatable; replaces --port and --interface.
        """
        from twisted.internet import reactor

        try:
            endpoints.serverFromString(reactor, description)
        except Exception as e:
            raise usage.UsageError(f"--listen {description!r}: {e}") from e
        self["listen"].append(description)

    def postOptions(self) -> None:
        try:
            self["format"] = Format(self["format"])
        except ValueError:
            choices = ", ".join(f.value for f in Format)
            raise usage.UsageError(
                f"--format must be one of {choices}, not {self['format']!r}"
            ) from None
        if not self["listen"]:
            self["listen"] = [portDescription(self["port"], self["interface"])]


@implementer(IStreamServerEndpoint)
class LoggingEndpoint:
    """
    Wraps a server endpoint to log where it listens, and keeps the port for whoever asks.
    """

    _log = Logger()

    def __init__(self, description: str, endpoint: IStreamServerEndpoint) -> None:
        self.description = description
        self._endpoint = endpoint
        self.port: IListeningPort | None = None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            self._log.info(
                "wschat listening on {address} ({description})",
                address=port.getHost(),
                description=self.description,
            )
            return port

        return self._endpoint.listen(protocolFactory).addCallback(listening)


def makeFactory(options: Options) -> ChatServerFactory:
    return ChatServerFactory(
        fmt=options["format"],
        welcome=options["welcome"],
        logMessages=not options["no-message-log"],
        limits=limitsFromOptions(options),
        compression=options["compression"],
    )


class ChatService(service.MultiService):
    """
    The daemon: one listening service per endpoint, all feeding one room.
    """

    def __init__(self, factory: ChatServerFactory, descriptions: list[str]) -> None:
        super().__init__()
        self.factory = factory
        self.endpoints: list[LoggingEndpoint] = []
        for description in descriptions:
            listener = strports.service(description, factory)
            endpoint = LoggingEndpoint(description, listener.endpoint)
            listener.endpoint = endpoint
            self.endpoints.append(endpoint)
            listener.setServiceParent(self)

    @property
    def ports(self) -> list[IListeningPort]:
        """The ports listened on, once the service has started."""
        return [e.port for e in self.endpoints if e.port is not None]


def makeService(options: Options) -> ChatService:
    return ChatService(makeFactory(options), options["listen"])
