"""
The daemon's one server object: the room, the bus, metrics, limits, origins and shutdown, with
its listeners (and the Redis bus, when there is one) as child services.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application import service, strports
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wschat.bus import Bus, LocalBus
from wschat.closing import closeAll
from wschat.dispatch import DispatchFactory
from wschat.handshake import HostPolicy, OriginPolicy
from wschat.history import DEFAULT_AGE, DEFAULT_BYTES, DEFAULT_COUNT, History
from wschat.limits import ConnectionCounter, Limits
from wschat.metrics import Metrics
from wschat.protocol import ChatServerFactory, ChatServerProtocol
from wschat.room import Room
from wschat.tuning import withBacklog
from wschat.turnlog import TurnLog
from wschat.web import makeMetricsSite, makeSite
from wschat.wire import Format, jsonWelcome, plural

DEFAULT_WELCOME = "Welcome to chat! Type a message"


class ListenError(Exception):
    """
    A listener could not listen: its endpoint description, and why in a few words.

    Short on purpose: daemonized ``twistd`` shows the parent only the first 100 bytes of
    the exception that stopped its child.
    """

    def __init__(self, description: str, reason: str) -> None:
        super().__init__(f"cannot listen on {description}: {reason}")
        self.description = description
        self.reason = reason


def _why(error: CannotListenError) -> str:
    """What stopped ``error``'s listen, in lower case: ``address already in use``."""
    cause = error.socketError
    text = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    return text[:1].lower() + text[1:]


@implementer(IStreamServerEndpoint)
class LoggingEndpoint:
    """
    Wraps a server endpoint to log where it listens, and keeps the port for whoever asks.
    """

    _log = Logger()

    def __init__(
        self, description: str, endpoint: IStreamServerEndpoint, what: str = "wschat"
    ) -> None:
        self.description = description
        self._endpoint = endpoint
        self.what = what
        self.port: IListeningPort | None = None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            self._log.info(
                "{what} listening on {address} ({description})",
                what=self.what,
                address=port.getHost(),
                description=self.description,
            )
            return port

        def failed(reason: Failure) -> Failure:
            # One line that names the endpoint, instead of a traceback through the reactor.
            if not isinstance(reason.value, CannotListenError):
                return reason
            problem = ListenError(self.description, _why(reason.value))
            self._log.critical("{what}: {problem}", what=self.what, problem=problem)
            return Failure(problem)

        return self._endpoint.listen(protocolFactory).addCallbacks(listening, failed)


class ChatServer(service.MultiService):
    """
    One chat daemon: a room fed by a bus, the connections' limits and policies, and the
    listeners that serve them.

    Each ``listen`` endpoint serves one web site (page, health, metrics) whose WebSocket
    handshakes go to :attr:`factory`; ``metricsListen`` moves metrics to an endpoint of
    their own. Nothing listens before the service starts.

    @param fmt: what the room relays to clients that did not ask for JSON.
    @param welcome: the greeting each new client gets ('' for none).
    @param history: how many recent messages the room keeps for recovery (0: history off,
        messages carry no position); ``historyAge`` (seconds) and ``historyBytes`` bound
        the window too.
    @param reactor: runs the connections and stamps the time; the global reactor unless given.
    @param clock: times the shutdown bound; ``reactor`` unless given.
    @param fastWrite: WebSocket connections over plain TCP write through
        :class:`wschat.fastwrite.FastTransport` (``--no-fast-write`` turns it off).
    """

    _log = Logger()

    def __init__(
        self,
        *,
        fmt: Format = Format.PREFIXED,
        welcome: str = DEFAULT_WELCOME,
        logMessages: bool = True,
        logConnections: bool = True,
        metrics: Metrics | None = None,
        origins: OriginPolicy | None = None,
        hosts: HostPolicy | None = None,
        trustedHops: int = 0,
        limits: Limits | None = None,
        compression: bool = False,
        fastWrite: bool = True,
        listen: Sequence[str] = (),
        metricsListen: str | None = None,
        serveMetrics: bool = True,
        shutdownTimeout: float = 5.0,
        history: int = DEFAULT_COUNT,
        historyAge: float = DEFAULT_AGE,
        historyBytes: int = DEFAULT_BYTES,
        reactor: Any = None,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.limits = limits = limits or Limits()
        self.compression = compression
        self.connectionsPerHost = ConnectionCounter(limits.maxConnectionsPerIp)
        self.metrics = metrics if metrics is not None else Metrics()
        self.welcome = welcome.encode("utf-8")
        self.logMessages = logMessages
        self.logConnections = logConnections
        self.origins = origins if origins is not None else OriginPolicy()
        #: The Host names the daemon answers to; the dispatcher in front of each port applies it.
        self.hosts = hosts if hosts is not None else HostPolicy.fromList([])
        self.trustedHops = trustedHops
        self.shutdownTimeout = shutdownTimeout
        self.shuttingDown = False
        #: The connections' log lines, emitted at the end of each reactor turn.
        self.lines = TurnLog(reactor)
        self.factory = ChatServerFactory(self)
        self.history = (
            History(history, historyAge, historyBytes, clock=reactor.seconds) if history else None
        )
        if self.history is not None:
            self.metrics.watchHistory(self.history)
        # The room frames each message once, for every member, with Autobahn's prepareMessage.
        self.room = Room(
            self.factory.prepareMessage,
            fmt,
            metrics=self.metrics,
            now=reactor.seconds,
            history=self.history,
            clock=reactor,
        )
        # Where received messages go: this room, or (--redis) every daemon's room.
        self.bus: Bus = LocalBus(self.room)
        self.site = makeSite(self, serveMetrics and metricsListen is None)
        self.endpoints: list[LoggingEndpoint] = []
        # One port serves both: each connection goes to the room or the site by its first request.
        chat = DispatchFactory(
            self.factory, self.site, reactor, hosts=self.hosts, fastWrite=fastWrite
        )
        # Members written through the dispatcher's writers share a busy turn's frames.
        self.room.turns = chat.turns
        for description in listen:
            self.endpoints.append(self._listen(description, chat))
        self.metricsEndpoint: LoggingEndpoint | None = None
        if serveMetrics and metricsListen is not None:
            metricsSite = makeMetricsSite(self)
            # Its requests are guarded as the chat port's are; WebSocket is not spoken there.
            guarded = DispatchFactory(
                None, metricsSite, reactor, hosts=self.hosts, timeout=limits.handshakeTimeout
            )
            self.metricsEndpoint = self._listen(metricsListen, guarded, "wschat metrics")

    def _listen(
        self, description: str, factory: IProtocolFactory, what: str = "wschat"
    ) -> LoggingEndpoint:
        listener = strports.service(withBacklog(description), factory, reactor=self.reactor)
        endpoint = LoggingEndpoint(description, listener.endpoint, what)
        listener.endpoint = endpoint
        listener.setServiceParent(self)
        return endpoint

    def useBus(self, bus: Bus) -> None:
        """
        Relay through ``bus`` instead of this room alone; a bus that is a service (the Redis
        bus) starts and stops with the server.
        """
        self.bus = bus
        if service.IService.providedBy(bus):
            service.IService(bus).setServiceParent(self)

    def accepting(self) -> bool:
        """Whether the daemon is running and so accepts connections (for /healthz)."""
        return bool(self.running)

    def unready(self) -> str | None:
        """
        Why the room cannot relay messages now (for /readyz), or None when it can: the daemon
        is not running or is shutting down, or its bus (the Redis link) is down.
        """
        if self.shuttingDown or not self.running:
            return "shutting down"
        # A bus that can be down (the Redis bus) says whether it is up; the local bus cannot be.
        if not getattr(self.bus, "available", True):
            return "Redis link down"
        return None

    @property
    def ports(self) -> list[IListeningPort]:
        """The ports listened on, once the service has started."""
        return [e.port for e in self.endpoints if e.port is not None]

    def greeting(self, connection: ChatServerProtocol, recovered: bool | None = None) -> bytes:
        """
        What ``connection`` receives first: the ``--welcome`` text, or for a JSON client
        a ``welcome`` object (always, since it tells the client its own address), with the
        room's position now when history is on, and ``recovered`` when it asked to recover.
        """
        if connection.format is Format.JSON:
            text = self.welcome.decode("utf-8")
            history = self.room.history
            return jsonWelcome(
                connection.address,
                self.room.online(),
                text,
                self.reactor.seconds(),
                maxMessageSize=self.limits.maxMessageSize,
                roomFormat=self.room.format,
                epoch=history.epoch if history is not None else None,
                seq=history.head if history is not None else 0,
                recovered=recovered,
            )
        return self.welcome

    def shutDown(self) -> Deferred[None]:
        """
        Refuse new handshakes (503), close every open connection with 1001, and fire once all
        are gone; connections still there after ``shutdownTimeout`` seconds (on ``clock``)
        are dropped.
        """
        self.shuttingDown = True
        members = [m for m in self.room if isinstance(m, ChatServerProtocol)]
        return closeAll(members, self.shutdownTimeout, self.clock)

    def stopService(self) -> Deferred[None]:
        """
        Stop listening first, so no one new arrives; then close every client with 1001 and
        wait for the close handshakes, at most ``shutdownTimeout`` seconds.
        """

        def closeClients(_: object) -> Deferred[None]:
            self.lines.flush()
            self._log.info(
                "Stopped listening; closing {connections} (1001 going away), "
                "waiting up to {timeout} s",
                connections=plural(len(self.room), "connection"),
                timeout=self.shutdownTimeout,
            )
            return self.shutDown()

        def flushLines(result: object) -> object:
            self.lines.flush()
            return result

        return maybeDeferred(super().stopService).addCallback(closeClients).addBoth(flushLines)

    def startService(self) -> None:
        super().startService()
        # Lines of the last turns before the reactor stops (it runs no more turns after).
        self.reactor.addSystemEventTrigger("after", "shutdown", self.lines.flush)
