"""
Test doubles and loopback helpers, shipped so that users' tests and ours share them.

- :func:`startDaemon` runs the daemon's real service tree in-process on a free port.
- :func:`connect` opens a real WebSocket client over loopback that queues what it receives;
  :func:`closeAll` closes several, :func:`bySender` splits what one saw by sender.
- :func:`spawn` runs a real command (`twistd`, the client) whose output a test waits on.
- :class:`MemoryRoom` is a server factory on a fake clock with in-memory clients.
- :class:`RawClient`, :func:`rawConnect` and :func:`rawExchange` send bytes by hand over TCP.
- :func:`memoryConnection` joins a server and a client protocol through in-memory transports,
  for protocol logic driven by a :class:`~twisted.internet.testing.MemoryReactorClock`.
- :func:`makeTLSFiles` writes a throwaway CA and a server certificate it signed, for ``wss://``.
- :func:`spawnTwistd` runs ``twistd -n wschat`` as a child process; :func:`listeningPort` finds
  the port it took.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, endpoints, ssl
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim

from wschat.protocol import ChatServerProtocol
from wschat.server import ChatServer
from wschat.tap import Options, buildServer


class QueueClientProtocol(WebSocketClientProtocol):
    """
    A WebSocket client that queues every message it receives, and tells when it closes.
    """

    factory: QueueClientFactory

    def connectionMade(self) -> None:
        self.messages: defer.DeferredQueue[tuple[bytes, bool]] = defer.DeferredQueue()
        self.closed: defer.Deferred[tuple[int | None, str | None]] = defer.Deferred()
        super().connectionMade()

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.put((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def sendText(self, text: str) -> None:
        self.sendMessage(text.encode("utf-8"))

    async def nextText(self) -> str:
        payload, isBinary = await self.messages.get()
        assert not isBinary, f"expected text, got binary {payload!r}"
        return payload.decode("utf-8")

    async def texts(self, count: int) -> list[str]:
        return [await self.nextText() for _ in range(count)]

    @property
    def address(self) -> str:
        """This client as the daemon names it in the prefix: ``ip:port`` or ``[ipv6]:port``."""
        assert self.transport is not None
        host = self.transport.getHost()
        assert isinstance(host, IPv4Address | IPv6Address), host
        return f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"


class QueueClientFactory(WebSocketClientFactory):
    protocol = QueueClientProtocol  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: defer.Deferred[QueueClientProtocol] = defer.Deferred()

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        # Refused or unreachable: fail the caller's await rather than leave it hanging.
        if not self.opened.called:
            self.opened.errback(reason)


def connect(
    url: str, contextFactory: Any = None, **factoryOptions: Any
) -> defer.Deferred[QueueClientProtocol]:
    """
    Open a real WebSocket connection to ``url``; fires with the open protocol.

    The greeting, if the daemon sends one, is the first message in its queue.
    """
    factory = QueueClientFactory(url, **factoryOptions)
    connectWS(factory, contextFactory)
    return factory.opened


def startDaemon(args: Sequence[str] = ()) -> tuple[ChatServer, str]:
    """
    Start the daemon's server in-process, parsing ``args`` as ``twistd wschat`` would (but
    without tuning the process as ``twistd wschat`` does).

    Listens on 127.0.0.1 on a free port unless ``args`` says where. Returns the running
    service and the ``ws://`` (or ``wss://``) URL of its first IPv4 TCP port, or "" if it has
    none. Stop it with ``stopService()``.
    """
    options = Options()
    args = list(args)
    if not any(a in ("--port", "-p") or a.startswith(("--port=", "--listen")) for a in args):
        args += ["--port", "0"]
    options.parseOptions(args)
    service = buildServer(options)
    service.startService()
    # TCP, SSL and UNIX endpoints listen synchronously: the ports are there already.
    if len(service.ports) != len(service.endpoints):
        raise RuntimeError(f"the daemon did not listen on every endpoint of {args}")
    url = ""
    for endpoint in service.endpoints:
        host = endpoint.port.getHost() if endpoint.port is not None else None
        if isinstance(host, IPv4Address):
            scheme = "wss" if endpoint.description.startswith("ssl:") else "ws"
            url = f"{scheme}://{host.host}:{host.port}"
            break
    return service, url


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS test: a CA certificate, and a server key and certificate it signed."""

    ca: Path
    key: Path
    cert: Path

    def serverCertificate(self) -> ssl.PrivateCertificate:
        """The server's key and certificate, for a TLS context (``.options()``)."""
        return ssl.PrivateCertificate.loadPEM(self.cert.read_bytes() + self.key.read_bytes())

    def trustRoot(self) -> ssl.Certificate:
        """The CA certificate, for a client that must trust the server."""
        return ssl.Certificate.loadPEM(self.ca.read_bytes())

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> str:
        """A ``--listen`` description serving TLS with these files."""
        quote = endpoints.quoteStringArgument
        return (
            f"ssl:{port}:interface={quote(interface)}"
            f":privateKey={quote(str(self.key))}:certKey={quote(str(self.cert))}"
        )


def makeTLSFiles(
    directory: Path,
    names: Sequence[str] = ("localhost",),
    addresses: Sequence[str] = ("127.0.0.1", "::1"),
) -> TLSFiles:
    """
    Write a new CA and a server certificate for ``names`` and ``addresses``, signed by it, into
    ``directory`` (``ca.pem``, ``key.pem``, ``cert.pem``). Valid from yesterday to tomorrow.
    """
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=1))
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wschat test CA")])
    caCert = (
        x509.CertificateBuilder()
        .subject_name(caName)
        .issuer_name(caName)
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(caKey.public_key()), False)
        .sign(caKey, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alternatives: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alternatives += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    subject = names[0] if names else addresses[0]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(caName)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()), False
        )
        .sign(caKey, hashes.SHA256())
    )
    files = TLSFiles(directory / "ca.pem", directory / "key.pem", directory / "cert.pem")
    files.ca.write_bytes(caCert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


def memoryConnection(
    serverFactory: Any,
    clientFactory: Any,
    peer: Any = None,
    clock: Any = None,
) -> tuple[Any, Any, iosim.IOPump]:
    """
    Connect a protocol from ``serverFactory`` to one from ``clientFactory`` in memory.

    Returns ``(server, client, pump)``; call ``pump.flush()`` to move bytes both ways.
    ``peer`` is the client address the server sees (default ``127.0.0.1:50000``).
    """
    clientAddress = peer or IPv4Address("TCP", "127.0.0.1", 50000)
    serverAddress = IPv4Address("TCP", "127.0.0.1", 2000)
    server = serverFactory.buildProtocol(clientAddress)
    client = clientFactory.buildProtocol(serverAddress)
    serverTransport = iosim.FakeTransport(
        server, isServer=True, hostAddress=serverAddress, peerAddress=clientAddress
    )
    clientTransport = iosim.FakeTransport(
        client, isServer=False, hostAddress=clientAddress, peerAddress=serverAddress
    )
    pump = iosim.connect(server, serverTransport, client, clientTransport, greet=False, clock=clock)
    return server, client, pump


class ProcessWatcher(ProcessProtocol):
    """
    A child process whose output tests wait on, line by line, without sleeping.

    ``waitFor(pattern, stream)`` fires with the first line (past or future) matching the
    regular expression; ``ended`` fires with the exit code.
    """

    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self._partial = {"out": b"", "err": b""}
        self._waiters: list[tuple[re.Pattern[str], str, int, defer.Deferred[re.Match[str]]]] = []
        #: Fires with the exit code (None when a signal ended the process).
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        #: Why it ended: ProcessDone, or ProcessTerminated with its exitCode and signal.
        self.endReason: BaseException | None = None

    @property
    def output(self) -> str:
        """Everything it wrote so far, standard output then standard error."""
        return "\n".join(self.lines["out"] + self.lines["err"])

    def outReceived(self, data: bytes) -> None:
        self._received("out", data)

    def errReceived(self, data: bytes) -> None:
        self._received("err", data)

    def _received(self, stream: str, data: bytes) -> None:
        *complete, self._partial[stream] = (self._partial[stream] + data).split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines[stream].append(line)
            for waiter in list(self._waiters):
                pattern, wanted, remaining, d = waiter
                match = pattern.search(line)
                if wanted == stream and match:
                    self._waiters.remove(waiter)
                    if remaining > 1:
                        self._waiters.append((pattern, wanted, remaining - 1, d))
                    else:
                        d.callback(match)

    def waitFor(
        self, pattern: str, stream: str = "out", count: int = 1
    ) -> defer.Deferred[re.Match[str]]:
        """Fire with the ``count``-th line of ``stream`` that matches ``pattern``."""
        compiled = re.compile(pattern)
        for line in self.lines[stream]:
            match = compiled.search(line)
            if match:
                count -= 1
                if count == 0:
                    return defer.succeed(match)
        d: defer.Deferred[re.Match[str]] = defer.Deferred()
        if self.ended.called:
            d.errback(AssertionError(f"process ended before printing {pattern!r}"))
        else:
            self._waiters.append((compiled, stream, count, d))
        return d

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def closeStdin(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()

    def signal(self, name: str) -> None:
        """Send the signal ``name`` (``TERM``, ``INT``, ``KILL``) unless it has exited."""
        if not self.ended.called and self.transport is not None:
            self.transport.signalProcess(name)

    async def kill(self) -> None:
        """Make sure it is gone (test clean-up)."""
        self.signal("KILL")
        await self.ended

    def processEnded(self, reason: Failure) -> None:
        for stream, rest in self._partial.items():
            if rest:
                self._received(stream, b"\n")
        waiters, self._waiters = self._waiters, []
        for pattern, _, _, d in waiters:
            d.errback(AssertionError(f"process ended before printing {pattern.pattern!r}"))
        self.endReason = reason.value
        self.ended.callback(getattr(reason.value, "exitCode", None))


def spawn(
    args: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None
) -> ProcessWatcher:
    """
    Run ``args`` (``args[0]`` found on the venv's or the system's PATH) with piped stdio.
    """
    from twisted.internet import reactor

    executable = findExecutable(args[0])
    watcher = ProcessWatcher()
    environment = dict(os.environ if env is None else env)
    environment.setdefault("PYTHONUNBUFFERED", "1")
    reactor.spawnProcess(  # type: ignore[attr-defined]
        watcher, executable, list(args), env=environment, path=cwd
    )
    return watcher


def findExecutable(name: str) -> str:
    """
    The program ``name`` beside this Python (its venv's ``twistd``, say), else on PATH; else
    ``name`` itself, for the process launcher to report as missing.
    """
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return shutil.which(name, path=path) or name


def freePort(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on at this moment (for a server started later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MemoryRoom:
    """
    A chat server on a fake clock, with in-memory clients connected to it.

    ``connect()`` returns ``(server, client)`` protocols with the handshake done;
    ``flush()`` moves every pending byte both ways; ``clock`` drives all timers.
    ``server`` is the :class:`~wschat.server.ChatServer`, built with ``serverOptions``.
    """

    def __init__(self, **serverOptions: Any) -> None:
        self.clock = MemoryReactorClock()
        self.server = ChatServer(reactor=self.clock, **serverOptions)
        self.factory = self.server.factory
        self.pumps: list[iosim.IOPump] = []

    def connect(
        self, port: int = 50000, peer: Any = None
    ) -> tuple[ChatServerProtocol, QueueClientProtocol]:
        clientFactory = QueueClientFactory("ws://127.0.0.1:2000", reactor=self.clock)
        server, client, pump = memoryConnection(
            self.factory,
            clientFactory,
            peer=peer or IPv4Address("TCP", "127.0.0.1", port),
            clock=self.clock,
        )
        self.pumps.append(pump)
        self.flush()
        return server, client

    def flush(self) -> None:
        # A frame received can cause frames sent (a broadcast, a close reply): pump until quiet.
        while any(pump.pump() for pump in self.pumps):
            pass


async def closeAll(clients: Sequence[QueueClientProtocol]) -> None:
    """Close every client cleanly (1000) and wait until each is closed."""
    for c in clients:
        c.sendClose(1000)
    await defer.gatherResults([c.closed for c in clients])


def bySender(order: Sequence[str], sent: Sequence[Sequence[str]]) -> list[list[str]]:
    """
    Split the prefixed lines one client saw into each sender's, in the order seen.

    Senders are told apart by what they sent (``sent[n]`` is sender n's texts, all distinct),
    not by their prefix: clients of different daemons may share a source port.
    """
    senderOf = {text: n for n, texts in enumerate(sent) for text in texts}
    lines: list[list[str]] = [[] for _ in sent]
    for line in order:
        lines[senderOf[line.split(": ", 1)[1]]].append(line)
    return lines


def received(client: QueueClientProtocol) -> list[tuple[bytes, bool]]:
    """Take everything a QueueClientProtocol has queued so far."""
    items = list(client.messages.pending)
    client.messages.pending.clear()
    return items


#: What ``twistd -n wschat`` logs once it listens; group 1 is the port.
LISTENING = r"wschat listening on IPv[46]Address\(.*?port=(\d+)\)"


def spawnTwistd(args: Sequence[str], cwd: str) -> ProcessWatcher:
    """
    Start ``twistd -n --pidfile= wschat ARGS`` (the twistd installed next to this Python) in
    the folder ``cwd``; ``await listeningPort(child)`` for its port.
    """
    return spawn(["twistd", "-n", "--pidfile=", "wschat", *args], cwd=cwd)


async def listeningPort(child: ProcessWatcher) -> int:
    """The first TCP port a ``twistd wschat`` child says it listens on."""
    return int((await child.waitFor(LISTENING)).group(1))


class RawClient(Protocol):
    """
    A TCP client that writes bytes by hand (what no well-behaved client would send) and keeps
    everything it receives; ``lost`` fires with all of it when the connection closes, and
    ``until(condition)`` once what it has received so far meets ``condition``.

    With ``read=False`` it never reads: the smallest receive window, and reading paused.
    """

    def __init__(self, data: bytes = b"", read: bool = True) -> None:
        self.data = data
        self.read = read
        self.received = b""
        self.lost: defer.Deferred[bytes] = defer.Deferred()
        self._waiting: list[tuple[Callable[[bytes], bool], defer.Deferred[bytes]]] = []

    def until(self, condition: Callable[[bytes], bool]) -> defer.Deferred[bytes]:
        """Fires with all received so far once ``condition`` holds; fails if it closes first."""
        d: defer.Deferred[bytes] = defer.Deferred()
        if condition(self.received):
            d.callback(self.received)
        else:
            self._waiting.append((condition, d))
        return d

    def connectionMade(self) -> None:
        assert self.transport is not None
        if not self.read:
            self.transport.getHandle().setsockopt(  # type: ignore[attr-defined]
                socket.SOL_SOCKET, socket.SO_RCVBUF, 1
            )
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        if self.data:
            self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        waiting, self._waiting = self._waiting, []
        for condition, d in waiting:
            if condition(self.received):
                d.callback(self.received)
            else:
                self._waiting.append((condition, d))

    def connectionLost(self, reason: Failure | None = None) -> None:
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.errback(ConnectionError(f"connection closed first; received {self.received!r}"))
        self.lost.callback(self.received)


async def rawConnect(url: str, client: RawClient) -> RawClient:
    """Connect ``client`` over TCP to the host and port of ``url`` (``ws://host:port/...``)."""
    from twisted.internet import reactor

    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    assert host is not None and port is not None, f"{url!r} has no host:port"
    endpointClass = endpoints.TCP6ClientEndpoint if ":" in host else endpoints.TCP4ClientEndpoint
    endpoint = endpointClass(reactor, host, port)
    await endpoints.connectProtocol(endpoint, client)
    return client


async def rawExchange(url: str, data: bytes) -> bytes:
    """Send ``data`` by hand; everything the daemon sent back until it closed."""
    client = await rawConnect(url, RawClient(data))
    return await client.lost
