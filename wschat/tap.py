"""
Options and service wiring for ``twistd wschat``: parse the command line, build the service tree.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distributionVersion
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from twisted import version as twistedVersion
from wschat.handshake import HostPolicy, OriginPolicy, listensOnLoopbackOnly
from wschat.history import DEFAULT_AGE, DEFAULT_BYTES, DEFAULT_COUNT
from wschat.limits import Limits, parseSize
from wschat.redisaddress import DEFAULT_CHANNEL, parseChannel, parseRedisURL
from wschat.server import DEFAULT_WELCOME, ChatServer, ListenError
from wschat.tuning import freezeStartupObjects, raiseFileLimit
from wschat.wire import Format

if TYPE_CHECKING:
    from wschat.redisbus import RedisBus


def wschatVersion() -> str:
    """The installed wschat's version, from its package metadata."""
    try:
        return distributionVersion("wschat")
    except PackageNotFoundError:
        return "(not installed)"


def portDescription(port: int, interface: str) -> str:
    """
    The endpoint description for ``--port``/``--interface`` (``tcp:2000:interface=127.0.0.1``).
    """
    return f"tcp:{port}:interface={endpoints.quoteStringArgument(interface)}"


def _bounded(
    convert: Callable[[str], float], low: float, what: str, high: float = math.inf
) -> Callable[[str], Any]:
    """
    A validator: ``convert`` the text and check ``low <= value <= high`` (refuses nan); else
    ``ValueError("'TEXT' is not WHAT")``, which :func:`_named` prefixes with the option.
    """

    def validate(value: str) -> Any:
        try:
            number = convert(value)
        except ValueError:
            number = math.nan
        if not low <= number <= high:
            raise ValueError(f"{value!r} is not {what}")
        return number

    return validate


_port = _bounded(int, 0, "a TCP port number (0-65535)", 65535)
_byteSize = _bounded(parseSize, 1, "a size in bytes, 1 or more (65536, 64K, 1MiB)")
_bytesOrOff = _bounded(parseSize, 0, "a size in bytes, 0 or more (65536, 64K, 1MiB)")
_positiveSeconds = _bounded(float, math.ulp(0), "a number of seconds above 0")
_secondsOrOff = _bounded(float, 0, "a number of seconds, 0 or more")
_messageRate = _bounded(float, 0, "a number of messages per second, 0 or more", sys.float_info.max)
_limitOrOff = _bounded(int, 0, "a whole number, 0 or more")
_positiveCount = _bounded(int, 1, "a whole number, 1 or more")


def _named(parameters: list[list[Any]]) -> list[list[Any]]:
    """
    ``parameters`` (usage.Options' ``optParameters``) whose validators' errors name their
    option: ``--port: 'abc' is not a TCP port number (0-65535)``, one line, instead of
    usage's "Parameter type enforcement failed" and Python's own wording.
    """
    named = []
    for parameter in parameters:
        if len(parameter) > 4 and parameter[4] is not None:
            parameter = [*parameter[:4], _naming(f"--{parameter[0]}", parameter[4])]
        named.append(parameter)
    return named


def _naming(option: str, coerce: Callable[[str], Any]) -> Callable[[str], Any]:
    def coerceNamed(value: str) -> Any:
        try:
            return coerce(value)
        except ValueError as e:
            # A UsageError, which usage.Options passes on as it is.
            raise usage.UsageError(f"{option}: {e}") from None

    coerceNamed.coerceDoc = getattr(coerce, "coerceDoc", "")  # type: ignore[attr-defined]
    return coerceNamed


def _endpoint(option: str, description: str) -> str:
    """Check that ``description`` is a server endpoint description (it is parsed, not used)."""
    from twisted.internet import reactor

    try:
        endpoints.serverFromString(reactor, description)
    except Exception as e:
        raise usage.UsageError(f"{option} {description!r}: {e}") from e
    return description


_defaults = Limits()

#: Resource limits (docs/operations.md, "Limits and hostile input"); each is a field of Limits.
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
    [
        "inbound-rate",
        None,
        _defaults.inboundRate,
        "Frames (messages, fragments, pings) per second each client is read at on average "
        "(0: any); a client sending faster is read more slowly, not closed.",
        _messageRate,
    ],
    [
        "inbound-bytes",
        None,
        _defaults.inboundBytes,
        "Bytes (64K, 1M...) per second each client is read at on average; 0: any.",
        _bytesOrOff,
    ],
    [
        "inbound-burst",
        None,
        _defaults.inboundBurst,
        "Seconds' worth of --inbound-rate and --inbound-bytes a client may send at once.",
        _positiveSeconds,
    ],
    [
        "inbound-hold",
        None,
        _defaults.inboundHold,
        "Seconds a client may keep sending past its inbound share before it is closed (1008).",
        _positiveSeconds,
    ],
    [
        "max-message-frames",
        None,
        _defaults.maxMessageFrames,
        "Frames one message may come in; more close the connection with 1009.",
        _positiveCount,
    ],
]


#: The history window (docs/operations.md, "History"): the room's recent messages, kept for
#: clients that reconnect (since=) or ask for them (history=).
HISTORY_PARAMETERS: list[list[Any]] = [
    [
        "history",
        None,
        DEFAULT_COUNT,
        "Recent messages the room keeps for clients that reconnect or ask for them "
        "(0: history off, messages carry no position).",
        _limitOrOff,
    ],
    [
        "history-ttl",
        None,
        DEFAULT_AGE,
        "Seconds a message stays in the history window.",
        _positiveSeconds,
    ],
    [
        "history-bytes",
        None,
        DEFAULT_BYTES,
        "Bytes (64K, 16M...) the history window may hold; the oldest messages go first.",
        _byteSize,
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
        inboundRate=options["inbound-rate"],
        inboundBytes=options["inbound-bytes"],
        inboundBurst=options["inbound-burst"],
        inboundHold=options["inbound-hold"],
        maxMessageFrames=options["max-message-frames"],
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
        [
            "redis",
            None,
            None,
            "Share one room with every daemon on the same Redis channel: "
            "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]. Default: this daemon alone.",
            parseRedisURL,
        ],
        ["channel", None, DEFAULT_CHANNEL, "Redis pub/sub channel of the room.", parseChannel],
        [
            "trust-forwarded-for",
            None,
            0,
            "Behind N trusted proxies, take the sender from the Nth-last X-Forwarded-For "
            "entry (0: ignore the header).",
            _limitOrOff,
        ],
        [
            "shutdown-timeout",
            None,
            5.0,
            "Seconds to wait on stop for clients to finish the close handshake (1001).",
            _secondsOrOff,
        ],
    ]
    optParameters += LIMIT_PARAMETERS
    optParameters += HISTORY_PARAMETERS
    optParameters = _named(optParameters)
    optFlags: list[list[str | None]] = [
        ["no-message-log", None, "Do not log message bodies (privacy, speed)."],
        [
            "no-connection-log",
            None,
            "Do not log each connection and disconnection (speed in reconnect storms).",
        ],
        ["no-metrics", None, "Do not serve Prometheus metrics at /metrics."],
        [
            "compression",
            None,
            "Offer permessage-deflate compression (costs CPU and memory per client).",
        ],
        [
            "no-fast-write",
            None,
            "Write through Twisted's transport buffers only, not straight to the socket "
            "(slower; to measure against).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["metrics-listen"] = None
        self["allowed-origin"] = []
        self["allowed-host"] = []

    def opt_version(self) -> NoReturn:
        """Display wschat's version and exit."""
        print(f"wschat {wschatVersion()} (Twisted {twistedVersion.short()})")
        sys.exit(0)

    def opt_listen(self, description: str) -> None:
        """
        Listen on a Twisted server endpoint description (tcp:2000:interface=0.0.0.0,
        tcp6:2000:interface=\\:\\:, unix:/run/wschat.sock,
        ssl:2443:privateKey=key.pem:certKey=cert.pem).
        Repeatable; replaces --port and --interface.
        """
        self["listen"].append(_endpoint("--listen", description))

    def opt_allowed_origin(self, origin: str) -> None:
        """Let in pages from ORIGIN too (https://host[:port]; '*' all; 'null'). Repeatable."""
        # By default only the daemon's own origin, and clients that send no Origin, get in.
        try:
            OriginPolicy.fromList([origin])
        except ValueError as e:
            raise usage.UsageError(f"--allowed-origin: {e}") from None
        self["allowed-origin"].append(origin)

    def opt_allowed_host(self, host: str) -> None:
        """
        Answer requests for HOST too (chat.example.com; .example.com: it and every name under
        it; '*': any). Repeatable. Always answered: localhost, loopback addresses, the address
        a connection arrived at, and this machine's host name.
        """
        try:
            HostPolicy.fromList([host], own=())
        except ValueError as e:
            raise usage.UsageError(f"--allowed-host: {e}") from None
        self["allowed-host"].append(host)

    def opt_metrics_listen(self, description: str) -> None:
        """Serve /metrics on this endpoint, not the chat port (tcp:9100:interface=127.0.0.1)."""
        self["metrics-listen"] = _endpoint("--metrics-listen", description)

    def postOptions(self) -> None:
        self["origins"] = OriginPolicy.fromList(self["allowed-origin"])
        self["hosts"] = HostPolicy.fromList(self["allowed-host"])
        if self["no-metrics"] and self["metrics-listen"] is not None:
            raise usage.UsageError("--no-metrics and --metrics-listen contradict each other")
        # JSON is not a daemon's format: each client asks for it (subprotocol wschat.json).
        choices = [f.value for f in Format if f is not Format.JSON]
        if self["format"] not in choices:
            raise usage.UsageError(
                f"--format must be one of {', '.join(choices)}, not {self['format']!r}"
            )
        self["format"] = Format(self["format"])
        if not self["listen"]:
            self["listen"] = [portDescription(self["port"], self["interface"])]
        if self["redis"] is not None:
            # Here, so that twistd reports a missing Redis client as the usage error it is.
            redisBusClass()


def buildServer(options: Options, reactor: Any = None) -> ChatServer:
    """
    The daemon ``options`` describe, not started, on ``reactor`` (the global one unless given).

    It leaves the process alone: an embedding program or a test gets a server and nothing else.
    """
    warnAboutHosts(options)
    server = ChatServer(
        fmt=options["format"],
        welcome=options["welcome"],
        logMessages=not options["no-message-log"],
        logConnections=not options["no-connection-log"],
        origins=options["origins"],
        hosts=options["hosts"],
        trustedHops=options["trust-forwarded-for"],
        limits=limitsFromOptions(options),
        compression=options["compression"],
        fastWrite=not options["no-fast-write"],
        listen=options["listen"],
        metricsListen=options["metrics-listen"],
        serveMetrics=not options["no-metrics"],
        shutdownTimeout=options["shutdown-timeout"],
        history=options["history"],
        historyAge=options["history-ttl"],
        historyBytes=options["history-bytes"],
        reactor=reactor,
    )
    if options["redis"] is not None:
        bus = redisBusClass()(
            server.room, options["redis"], options["channel"], reactor=server.reactor
        )
        server.useBus(bus)
    return server


def redisBusClass() -> type[RedisBus]:
    """
    The Redis bus, imported only when asked for: a daemon without ``--redis`` never loads the
    Redis client. Without the ``redis`` extra installed, a usage error says how to get it.
    """
    try:
        from wschat.redisbus import RedisBus
    except ImportError as e:
        raise usage.UsageError(
            f"--redis needs the Redis client ({e.name or e} is not installed): "
            "pip install 'wschat[redis]'"
        ) from None
    return RedisBus


_log = Logger()


def warnAboutHosts(options: Options) -> None:
    """
    Say at start-up which Host names a daemon reachable from other machines answers to, when
    no --allowed-host lists any: requests for other names (a DNS name, a proxy's) get 403.
    """
    if options["allowed-host"]:
        return
    for description in options["listen"]:
        if not listensOnLoopbackOnly(description):
            names = sorted(options["hosts"].own)
            _log.warn(
                "{description} is not loopback only, and no --allowed-host is given: requests "
                "are answered only for localhost, the address they arrive at{names}; give "
                "--allowed-host NAME for each name clients use (a DNS name, a proxy's)",
                description=description,
                names="".join(f", {name}" for name in names),
            )
            return


def makeService(options: Options) -> ChatServer:
    """
    The ``twistd wschat`` start path: the server, and the process tuned for many connections
    (open files, the garbage collector). Only the daemon's own process should be tuned so.
    """
    raiseFileLimit()
    reportListenErrors()
    server = buildServer(options)
    freezeStartupObjects()
    return server


def reportListenErrors() -> None:
    """
    Make a listener that cannot listen (a port in use, say) stop ``twistd`` with one line on
    standard error, ``wschat: cannot listen on ENDPOINT: WHY``, and exit status 1, instead of a
    traceback. (The server has logged the same line; daemonized, twistd's parent process shows
    the error's first 100 bytes and points to the log.)
    """
    previous = sys.excepthook

    def excepthook(
        kind: type[BaseException], value: BaseException, tb: TracebackType | None
    ) -> None:
        if isinstance(value, ListenError) and sys.__stderr__ is not None:
            # Standard error as the process got it: twistd has sent sys.stderr to its log.
            sys.__stderr__.write(f"wschat: {value}\n")
            sys.__stderr__.flush()
            return
        previous(kind, value, tb)

    sys.excepthook = excepthook
