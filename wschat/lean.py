"""
Smaller connections: Autobahn's options as class attributes instead of per-connection copies.

When a connection is made, Autobahn copies each of its protocol options (``CONFIG_ATTRS``,
about fifty) from the factory onto the protocol *instance*, unless the protocol already has
that attribute. Those copies are a third of an idle connection's memory (they push its
``__dict__`` into the next size up). :func:`protocolClass` gives a factory a subclass of its
protocol carrying the factory's current option values as class attributes, so the copy is
skipped and every connection shares them. The values are compared on each call: a
``setProtocolOptions`` call makes a new subclass, so new connections see new options just as
with Autobahn's copies (a connection keeps the options it started with).

The subclass also has an empty ``CONFIG_ATTRS``: the copy loop has nothing left to copy, and
Autobahn no longer pretty-prints all fifty options on every connection for a debug log line
that is off (that formatting was a third of the cost of a handshake). An option set on one
connection (``protocol.openHandshakeTimeout = 0``) still overrides the class's, as with
Autobahn's copies.

Once a connection is open, :func:`trimOpenConnection` lets go of what Autobahn keeps from the
handshake (request and response text, headers) and of its empty send queue's first block:
about a quarter of an idle connection's memory.

The opening handshake
    :func:`openHandshake` answers the common WebSocket handshake itself, from the request
    head the dispatcher has already parsed, and puts the Autobahn protocol into the open state
    as Autobahn's ``processHandshake`` and ``succeedHandshake`` would: the same attributes, the
    same ``onConnect`` request, the same 101 response bytes, the same ``onOpen``. It skips what
    that path costs beyond the answer: parsing the head again, eager debug-log arguments, and
    the Deferred round trip around ``onConnect``. It takes only a plain request (GET,
    HTTP/1.1, version 13, one valid key, one Host, CRLF line ends, an origin Autobahn would
    allow, a protocol whose ``onConnect`` answers at once, and no extension offer unless
    Autobahn would decline them all: compression off, and every offer one that Autobahn's
    own parsers read without error, as a browser's ``permessage-deflate`` is): anything
    else, and every request on an Autobahn version these rules were not checked against
    (:data:`PINNED`), goes through Autobahn's own handshake, so its errors and statuses are
    Autobahn's. (One difference: bytes a client sends in the same read as its head are
    counted in Autobahn's traffic statistics as read after the opening, not before it.)

The connection's start
    :func:`connectionMade` does what Autobahn's ``connectionMade`` does for a server
    connection of a :func:`protocolClass` class, without the debug-log arguments Autobahn
    formats even with debug logging off, and without the UTF-8 validator, which such a class
    makes when Autobahn first asks for it: a connection that never receives a text message
    never has one.

Receiving frames
    :func:`receiveFrames` reads what an open server connection receives as Autobahn's frame
    parser would, for the common case: complete, unfragmented, masked text and binary
    frames with a 7- or 16-bit length within the connection's limits, text being valid
    UTF-8 (Python's strict decoder gives Autobahn's validator's verdict on a whole
    message). Each gets the hooks Autobahn calls (``onMessageBegin``,
    ``onMessageFrameBegin``, ``onMessage``, the ``message`` event's listeners), its traffic
    counts, the ping timeout's cancelling, and the attributes Autobahn's parser leaves,
    without its per-frame parsing, masker, validator and Deferred. At the first other
    frame (control, fragment, cut off by the read, malformed, over a limit, bad UTF-8), or
    once a hook has closed the connection, the rest goes to Autobahn's parser from exactly
    there, so its errors and close codes are Autobahn's. Only for a class that says its
    later message hooks are Autobahn's while open (``leanFrames = True``), with no
    compression, no frame or octet logging, no debug logging, and on a :data:`PINNED`
    Autobahn.

tests/test_lean.py opens connections both ways and compares every attribute;
tests/test_lean_frames.py feeds the same byte streams to connections reading frames either
way and compares what they did and became.
"""

from __future__ import annotations

import base64
import hashlib
import operator
import re
import types
from collections import deque
from typing import Any
from urllib import parse

import autobahn
import txaio
from autobahn.websocket import protocol as _ab
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest

_MISSING = object()

#: txaio's functions are set up at run time (for Twisted): typed loosely.
_txaio: Any = txaio


class _Made:
    """A class made for a factory, and the option values it was made with."""

    def __init__(self, base: type, cls: type, names: tuple[str, ...], factory: Any) -> None:
        self.base = base
        self.cls = cls
        # One C call reads every option: how a change is noticed cheaply on each connection.
        self._read: Any = operator.attrgetter(*names) if names else (lambda f: ())
        self._values: object
        try:
            self._values = self._read(factory)
        except AttributeError:
            self._values = _MISSING  # an option missing: never reused

    def fits(self, factory: Any) -> bool:
        try:
            return bool(self._read(factory) == self._values)
        except AttributeError:
            return False


class _LazyValidator:
    """
    A connection's UTF-8 validator, made when Autobahn first asks for it (the first text
    message it receives): a connection that receives none never pays for one.
    """

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        validator = instance.__dict__["utf8validator"] = _ab.Utf8Validator()
        return validator


def protocolClass(factory: Any) -> type:
    """The protocol class for ``factory``'s next connection."""
    base = factory.protocol
    made = factory.__dict__.get("_leanProtocol")
    if made is not None and made.base is base and made.fits(factory):
        return made.cls  # type: ignore[no-any-return]
    names = tuple(getattr(base, "CONFIG_ATTRS", ()))
    values = [getattr(factory, name, _MISSING) for name in names]
    namespace: dict[str, Any] = {
        # A function stored on a class would become a method: keep it a plain value.
        n: staticmethod(v) if isinstance(v, types.FunctionType) else v
        for n, v in zip(names, values, strict=True)
        if v is not _MISSING
    }
    # Nothing left for Autobahn to copy or to log (see above).
    namespace["CONFIG_ATTRS"] = ()
    # Made on first use (see connectionMade below).
    namespace["utf8validator"] = _LazyValidator()
    namespace["__module__"] = base.__module__
    namespace["__qualname__"] = base.__qualname__
    subclass = type(base.__name__, (base,), namespace)
    factory._leanProtocol = _Made(base, subclass, names, factory)
    return subclass


class SendQueue(list[Any]):
    """
    Autobahn's queue of chopped and synchronous sends, as a list: an empty ``deque`` takes
    760 bytes (its first block), an empty list 56. wschat never chops nor syncs a send, so
    the queue stays empty; should anything use it, it works as the ``deque`` did (``append``,
    ``popleft``, ``len``).
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


#: What a released ``http_headers`` becomes: empty, shared, read-only.
_NO_HEADERS: Any = types.MappingProxyType({})


def trimOpenConnection(protocol: Any) -> None:
    """
    Let go of what an open connection no longer needs: the handshake's request and response
    text and headers (read during the handshake only), and the ``deque`` of Autobahn's send
    queue while it is empty (replaced by a :class:`SendQueue`). About 2 KB per connection.
    """
    queue = getattr(protocol, "send_queue", None)
    if type(queue) is deque and not queue:
        protocol.send_queue = SendQueue()
    for name in ("http_request_data", "http_response_data"):
        if name in protocol.__dict__:
            setattr(protocol, name, None)
    if "http_headers" in protocol.__dict__:
        protocol.http_headers = _NO_HEADERS


#: The Autobahn versions whose handshake :func:`openHandshake` reproduces (tests/test_lean.py
#: compares the two). On any other version every handshake goes through Autobahn.
PINNED = frozenset({"26.10.2"})

#: What the lean handshake needs of Autobahn's protocol module.
_NEEDED = (
    "_url_to_origin",
    "_is_same_origin",
    "WebSocketProtocol",
    "WebSocketServerProtocol",
    "TrafficStats",
    "Utf8Validator",
    "PERMESSAGE_COMPRESSION_EXTENSION",
)

#: Whether this Autobahn is one :func:`openHandshake` may stand in for.
ENABLED = (
    autobahn.__version__ in PINNED
    and all(hasattr(_ab, name) for name in _NEEDED)
    and hasattr(_ab.WebSocketProtocol, "_parseExtensionsHeader")
)


def _declineAllCode() -> types.CodeType | None:
    """
    The code of Autobahn's default ``perMessageCompressionAccept`` (``lambda _: None``, made
    anew for each factory by ``resetProtocolOptions``), which declines every compression
    offer; None if there is not exactly one such function there.
    """
    reset = getattr(_ab.WebSocketServerFactory, "resetProtocolOptions", None)
    code = getattr(reset, "__code__", None)
    if code is None:
        return None
    found = [c for c in code.co_consts if isinstance(c, types.CodeType) and c.co_name == "<lambda>"]
    return found[0] if len(found) == 1 else None


#: A connection whose ``perMessageCompressionAccept`` runs this code has compression off.
_DECLINE_ALL = _declineAllCode() if ENABLED else None

_CONNECTING = _ab.WebSocketProtocol.STATE_CONNECTING
_OPEN = _ab.WebSocketProtocol.STATE_OPEN
_WS_MAGIC = _ab.WebSocketProtocol._WS_MAGIC if ENABLED else b""

#: What Autobahn's head parser (``str.splitlines`` of the Latin-1 text) splits lines on,
#: besides CR and LF: a head with any of them goes to Autobahn, which parses it its own way.
_LINE_BREAKS = re.compile(rb"[\x0b\x0c\x1c-\x1e\x85]")

_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/")

#: Request headers the lean handshake reads, each of which may appear once only.
_ONCE = (
    b"host",
    b"sec-websocket-version",
    b"sec-websocket-key",
    b"origin",
    b"sec-websocket-extensions",
)


#: What Autobahn's ``_connectionMade`` sets on every server connection, and to what (apart
#: from the per-connection objects :func:`connectionMade` makes).
_FRESH: dict[str, Any] = {
    "_perMessageCompress": None,
    "trackedTimings": None,
    "state": _CONNECTING,
    "send_state": _ab.WebSocketProtocol.SEND_STATE_GROUND if ENABLED else None,
    "data": b"",
    "triggered": False,
    "wasMaxFramePayloadSizeExceeded": False,
    "wasMaxMessagePayloadSizeExceeded": False,
    "closedByMe": False,
    "failedByMe": False,
    "droppedByMe": False,
    "wasClean": False,
    "wasNotCleanReason": None,
    "wasServerConnectionDropTimeout": False,
    "wasOpenHandshakeTimeout": False,
    "wasCloseHandshakeTimeout": False,
    "wasServingFlashSocketPolicyFile": False,
    "localCloseCode": None,
    "localCloseReason": None,
    "remoteCloseCode": None,
    "remoteCloseReason": None,
    "openHandshakeTimeoutCall": None,
    "closeHandshakeTimeoutCall": None,
    "autoPingTimeoutCall": None,
    "autoPingPending": None,
    "autoPingPendingCall": None,
    "autoPingPendingSeq": 0,
    "autoPingPendingSent": None,
}

#: Autobahn's Twisted helper for a connection's transport details.
_createTransportDetails: Any = None
_WEBSOCKET_FRAMING: Any = None
if ENABLED:
    from autobahn.twisted.util import create_transport_details as _createTransportDetails
    from autobahn.wamp.types import TransportDetails

    _WEBSOCKET_FRAMING = TransportDetails.CHANNEL_FRAMING_WEBSOCKET


def connectionMade(protocol: Any) -> bool:
    """
    Start a server connection as Autobahn's ``connectionMade`` does (transport details, the
    peer, TCP_NODELAY, the connection's initial state, its count, the handshake timer),
    without its debug logging (whose arguments it formats even with debug off) and without a
    UTF-8 validator until one is needed. True if it did; False (nothing done) for a protocol
    not made by :func:`protocolClass`, or one timing its handshakes, or on an Autobahn not
    pinned: then Autobahn's ``connectionMade`` is for it.
    """
    cls = type(protocol)
    if (
        not ENABLED
        or cls.CONFIG_ATTRS
        or not isinstance(cls.__dict__.get("utf8validator"), _LazyValidator)
        or protocol.trackTimings
        or not protocol.factory.isServer
    ):
        return False
    transport = protocol.transport
    details = _createTransportDetails(transport, protocol.is_server)
    details.channel_framing = _WEBSOCKET_FRAMING
    protocol._transport_details = details
    protocol.peer = details.peer
    try:
        transport.setTcpNoDelay(protocol.tcpNoDelay)
    except Exception:  # as Autobahn: UNIX sockets, and transports without TCP options
        pass
    state = protocol.__dict__
    state.update(_FRESH)
    state["trafficStats"] = _ab.TrafficStats()
    state["send_queue"] = deque()
    if protocol.openHandshakeTimeout > 0:
        state["openHandshakeTimeoutCall"] = protocol.factory._batched_timer.call_later(
            protocol.openHandshakeTimeout, protocol.onOpenHandshakeTimeout
        )
    protocol.factory.countConnections += 1
    return True


def _hasToken(value: str, token: str) -> bool:
    """Whether a comma-separated header ``value`` lists ``token`` (any case), as Autobahn asks."""
    if value.lower() == token:
        return True
    for item in value.split(","):
        if item.strip().lower() == token:
            return True
    return False


def _declinedExtensions(protocol: Any, value: str) -> list[Any] | None:
    """
    The extensions a ``Sec-WebSocket-Extensions`` header ``value`` offers, as Autobahn's
    ``processHandshake`` parses them (``(name, params)`` pairs), if Autobahn's
    ``succeedHandshake`` would decline them all and answer without any: ``protocol`` has
    compression off (Autobahn's default ``perMessageCompressionAccept``) and each
    ``permessage-*`` offer is one Autobahn's own parser for it reads without error (an offer
    it cannot read fails Autobahn's handshake). None otherwise: Autobahn's handshake is for
    that request (its negotiation, its errors).
    """
    accept = protocol.perMessageCompressionAccept
    if _DECLINE_ALL is None or getattr(accept, "__code__", None) is not _DECLINE_ALL:
        return None
    try:
        extensions: list[Any] = protocol._parseExtensionsHeader(value)
        for name, params in extensions:
            pmce: Any = _ab.PERMESSAGE_COMPRESSION_EXTENSION.get(name)
            if pmce is not None:
                pmce["Offer"].parse(params)
    except Exception:
        return None
    return extensions


def openHandshake(
    protocol: Any, head: bytes, fields: dict[bytes, list[bytes]], rest: bytes = b""
) -> bool:
    """
    Answer the WebSocket handshake ``head`` (request line, headers and the empty line) of
    ``protocol`` (connected, not yet fed any byte), whose header ``fields`` the dispatcher
    parsed, and once open hand it ``rest`` (what the client sent behind its head); True if it
    did (the connection is open, or ``onConnect`` refused it), False if the request is for
    Autobahn's handshake (``protocol`` is untouched).

    Only for a protocol class that says its ``onConnect`` answers at once and never with a
    Deferred (``leanHandshake = True``).
    """
    if not ENABLED or not getattr(protocol, "leanHandshake", False):
        return False
    factory = protocol.factory
    if (
        protocol.state != _CONNECTING
        or protocol.data
        or protocol.trustXForwardedFor
        or protocol.logOctets
        or protocol.trackedTimings is not None
        or protocol.send_queue
        or (protocol.maxConnections > 0 and factory.countConnections > protocol.maxConnections)
    ):
        return False
    # Only CRLF line ends, no folded line, no other line break: lines as Autobahn splits them.
    lines = head.count(b"\r\n")
    if (
        head.count(b"\r") != lines
        or head.count(b"\n") != lines
        or b"\r\n " in head
        or b"\r\n\t" in head
        or _LINE_BREAKS.search(head) is not None
    ):
        return False
    for name in _ONCE:
        if len(fields.get(name, ())) > 1:
            return False
    # The request line, as Autobahn splits it.
    line = head[: head.find(b"\r\n")].decode("latin-1").strip()
    rl = line.split()
    if len(rl) != 3 or rl[0] != "GET" or rl[2] != "HTTP/1.1":
        return False
    uri = rl[1]
    # A plain path (and query): what urlparse splits into path and query alone.
    if uri[:1] != "/" or uri[:2] == "//" or "#" in uri or ";" in uri:
        return False
    path, _, query = uri.partition("?")
    # Headers as Autobahn's parser makes them: Latin-1 text, stripped, repeated ones joined.
    headers: dict[str, str] = {}
    for name, values in fields.items():
        if not name.isascii():
            return False
        if len(values) == 1:
            headers[name.decode("ascii")] = values[0].decode("latin-1").strip()
        else:
            headers[name.decode("ascii")] = ", ".join(v.decode("latin-1").strip() for v in values)
    # Host: present; a port, if any, a number (and the external port, if the factory has one).
    host = headers.get("host")
    if host is None:
        return False
    if ":" in host and not host.endswith("]"):
        host, port = host.rsplit(":", 1)
        try:
            portNumber = int(port.strip())
        except ValueError:
            return False
        if factory.externalPort and portNumber != factory.externalPort:
            return False
    if not _hasToken(headers.get("upgrade", ""), "websocket"):
        return False
    if not _hasToken(headers.get("connection", ""), "upgrade"):
        return False
    version = headers.get("sec-websocket-version")
    if version is None or version.strip() != "13" or 13 not in protocol.versions:
        return False
    protocols: list[str] = []
    if "sec-websocket-protocol" in headers:
        protocols = [str(x.strip()) for x in headers["sec-websocket-protocol"].split(",")]
        if len(set(protocols)) != len(protocols):
            return False
    origin = headers.get("origin", "")
    if "origin" in headers:
        try:
            originTuple = _ab._url_to_origin(origin)
        except ValueError:
            return False
        if not (
            (originTuple == "null" and factory.allowNullOrigin)
            or _ab._is_same_origin(
                originTuple,
                "https" if factory.isSecure else "http",
                factory.externalPort or factory.port,
                protocol.allowedOriginsPatterns,
            )
        ):
            return False
    key = headers.get("sec-websocket-key")
    if key is None or len(key) != 24 or key[-2:] != "==" or not _KEY_CHARS.issuperset(key[:-2]):
        return False
    extensions: list[Any] = []
    if "sec-websocket-extensions" in headers:
        declined = _declinedExtensions(protocol, headers["sec-websocket-extensions"])
        if declined is None:
            return False
        extensions = declined

    # What processHandshake keeps, in its order.
    protocol.trafficStats.preopenIncomingOctetsWireLevel += len(head)
    protocol.http_request_data = head
    protocol.http_status_line = line
    protocol.http_headers = headers
    protocol.http_request_uri = uri
    protocol.http_request_path = path
    protocol.http_request_params = parse.parse_qs(query) if query else {}
    protocol.http_request_host = host
    protocol.websocket_version = 13
    protocol.websocket_protocols = protocols
    protocol.websocket_origin = origin
    protocol.websocket_extensions = extensions
    protocol._wskey = key
    request = ConnectionRequest(
        protocol.peer,
        headers,
        host,
        path,
        protocol.http_request_params,
        13,
        origin,
        protocols,
        extensions,
    )
    try:
        answer = protocol.onConnect(request)
    except ConnectionDeny as e:
        protocol.failHandshake(e.reason, e.code)
        return True
    except Exception:
        # As Autobahn answers an onConnect that failed.
        err = _txaio.create_failure()
        protocol.log.warn("Unexpected exception in onConnect ['{err.value}']", err=err)
        protocol.log.warn("{tb}", tb=_txaio.failure_format_traceback(err))
        protocol.failHandshake(
            f"Internal server error: {err.value}", ConnectionDeny.INTERNAL_SERVER_ERROR
        )
        return True
    _succeed(protocol, answer)
    factory.leanHandshakes = getattr(factory, "leanHandshakes", 0) + 1
    if rest and protocol.state == _OPEN:
        # Frames sent right behind the head: read as any later ones (Autobahn parses them
        # within its handshake, uncounted by a protocol's own dataReceived).
        protocol.dataReceived(rest)
    return True


def _succeed(protocol: Any, answer: Any) -> None:
    """What Autobahn's ``succeedHandshake`` does when it agrees to no extension."""
    subprotocol = None
    extra: dict[str, Any] = {}
    if type(answer) is tuple:
        if len(answer) > 0:
            subprotocol = answer[0]
        if len(answer) > 1:
            extra = answer[1]
    else:
        subprotocol = answer
    if subprotocol is not None and subprotocol not in protocol.websocket_protocols:
        raise Exception("protocol accepted must be from the list client sent or None")
    protocol.websocket_protocol_in_use = subprotocol
    protocol.websocket_extensions_in_use = []
    factory = protocol.factory
    response = "HTTP/1.1 101 Switching Protocols\r\n"
    if factory.server:
        response += f"Server: {factory.server}\r\n"
    response += "Upgrade: WebSocket\r\nConnection: Upgrade\r\n"
    for source in (factory.headers.items(), extra.items()):
        for name, value in source:
            if isinstance(value, str):
                values: Any = [value]
            else:
                try:
                    values = iter(value)
                except TypeError:
                    values = [value]
            for v in values:
                response += f"{name}: {v}\r\n"
    if subprotocol is not None:
        response += f"Sec-WebSocket-Protocol: {subprotocol}\r\n"
    accept = base64.b64encode(hashlib.sha1(protocol._wskey.encode() + _WS_MAGIC).digest())
    response += f"Sec-WebSocket-Accept: {accept.decode()}\r\n\r\n"
    data = response.encode("utf8")
    # sendData with nothing queued (checked above) and no octet logging: one write.
    protocol.transport.write(data)
    protocol.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
    protocol.http_response_data = response
    protocol.state = _OPEN
    call = protocol.openHandshakeTimeoutCall
    if call is not None:
        call.cancel()
        protocol.openHandshakeTimeoutCall = None
    protocol.inside_message = False
    protocol.current_frame = None
    if protocol.autoPingInterval:
        protocol.autoPingPendingCall = factory._batched_timer.call_later(
            protocol.autoPingInterval, protocol._sendAutoPing
        )
    protocol._onOpen()
    _txaio.resolve(protocol.is_open, None)


# -- receiving frames

#: Autobahn's log method for a level that is off (txaio binds it to each such level).
_noOp: Any = getattr(getattr(txaio, "tx", None), "_no_op", None)
_CLOSED = _ab.WebSocketProtocol.STATE_CLOSED

#: What Autobahn leaves as a connection's ``current_frame_masker`` after a frame, by payload
#: length: a new masker of one of these types, never used again (a frame's header makes the
#: next). One shared instance of each type stands in for it.
_MASKERS: tuple[Any, Any, Any] = (None, None, None)
_FRAME_HEADER: Any = None
_createXorMasker: Any = None
_XorMaskerNull: Any = None
if ENABLED:
    from autobahn.twisted import websocket as _twistedWebsocket
    from autobahn.websocket.xormasker import XorMaskerNull, create_xor_masker

    _createXorMasker = create_xor_masker
    _XorMaskerNull = XorMaskerNull
    _FRAME_HEADER = _ab.FrameHeader
    _MASKERS = (
        XorMaskerNull(),
        create_xor_masker(b"\0\0\0\0", 1),
        create_xor_masker(b"\0\0\0\0", 128),
    )

#: Below this payload length a frame is unmasked with one integer XOR; from it on, with
#: Autobahn's native masker (faster for long payloads, slower to make).
_NATIVE_UNMASK = 1024

#: The Autobahn methods a lean frame's hooks must be (they are called, or done, directly).
_AUTOBAHN_HOOKS = (
    "_onMessageBegin",
    "_onMessageFrameBegin",
    "_onMessageFrameData",
    "_onMessageFrameEnd",
    "_onMessageFrame",
    "_onMessageEnd",
    "_onMessage",
)
_DEFAULT_HOOKS = ("onMessageFrameEnd", "onMessageEnd", "fire")

#: Classes checked by :func:`_leanReceiver`, and the verdict.
_receivers: dict[type, bool] = {}


def _leanReceiver(cls: type) -> bool:
    """
    Whether connections of ``cls`` may have their frames read by :func:`receiveFrames`: a
    :func:`protocolClass` server class that says its message hooks allow it
    (``leanFrames = True``), whose Twisted adapter hooks and frame and message ends are
    Autobahn's own.
    """
    verdict = _receivers.get(cls)
    if verdict is None:
        adapter = _twistedWebsocket.WebSocketAdapterProtocol
        base = _ab.WebSocketProtocol
        verdict = bool(
            ENABLED
            and _noOp is not None
            and getattr(cls, "leanFrames", False)
            and issubclass(cls, _ab.WebSocketServerProtocol)
            and isinstance(cls.__dict__.get("utf8validator"), _LazyValidator)
            and all(getattr(cls, n) is getattr(adapter, n) for n in _AUTOBAHN_HOOKS)
            and all(getattr(cls, n) is getattr(base, n) for n in _DEFAULT_HOOKS)
        )
        _receivers[cls] = verdict
    return verdict


def receiveFrames(protocol: Any, data: bytes) -> bool:
    """
    Read ``data``, received by the open server connection ``protocol``, as Autobahn's
    ``dataReceived`` would; True if it did, False if ``data`` is for Autobahn's
    ``dataReceived`` (``protocol`` untouched).

    Complete, unfragmented, masked text and binary frames with a 7- or 16-bit length within
    the connection's limits (and, text, valid UTF-8) are read here: the same hooks are
    called, with the same arguments and attributes, as Autobahn's frame parser calls and
    leaves. From the first byte of any other frame (control, fragment, cut off by the read,
    malformed, too long, bad UTF-8), or once a hook changed the connection's state, the rest
    goes to Autobahn's parser, from exactly where it is.
    """
    if (
        protocol.state != _OPEN
        or protocol.data
        or protocol.current_frame is not None
        or protocol.inside_message
        or protocol._perMessageCompress is not None
        or protocol.logOctets
        or protocol.logFrames
        or protocol.trackedTimings
        or protocol.failedByMe
        or protocol._listeners is not None
        or not protocol.applyMask
        or protocol.log.debug is not _noOp
        or not _leanReceiver(type(protocol))
    ):
        return False
    size = len(data)
    stats = protocol.trafficStats
    stats.incomingOctetsWireLevel += size
    validate = protocol.utf8validateIncoming
    i = 0
    while size - i >= 6:
        b0 = data[i]
        if b0 != 0x81 and b0 != 0x82:
            break
        length = data[i + 1] ^ 0x80
        if length > 125:
            # Unmasked (a protocol error), or a longer length.
            if length != 126 or size - i < 8:
                break
            length = (data[i + 2] << 8) | data[i + 3]
            if length < 126:
                break  # not the shortest encoding: Autobahn's error
            start = i + 8
        else:
            start = i + 6
        end = start + length
        if end > size:
            break
        limit = protocol.maxMessagePayloadSize
        if 0 < limit < length:
            break
        limit = protocol.maxFramePayloadSize
        if 0 < limit < length:
            break
        mask = data[start - 4 : start]
        if not length:
            payload = b""
        elif length < _NATIVE_UNMASK:
            payload = (
                int.from_bytes(data[start:end], "little")
                ^ int.from_bytes((mask * ((length >> 2) + 1))[:length], "little")
            ).to_bytes(length, "little")
        else:
            payload = _createXorMasker(mask, length).process(data[start:end])
        isBinary = b0 == 0x82
        checked = validate and not isBinary
        if checked and not payload.isascii():
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                break  # Autobahn's 1007
        # onFrameBegin: a message begins.
        protocol.current_frame_masker = _MASKERS[0 if not length else 1 if length < 128 else 2]
        protocol.inside_message = True
        protocol._isMessageCompressed = False
        protocol.utf8validateIncomingCurrentMessage = checked
        if checked:
            protocol.utf8validateLast = (True, True, 0, 0)
        protocol.onMessageBegin(isBinary)
        protocol.onMessageFrameBegin(length)
        if protocol.state != _OPEN or protocol.failedByMe:
            # A hook closed the connection: Autobahn reads this frame's payload on.
            if checked:
                protocol.utf8validator.reset()
            protocol.current_frame = _FRAME_HEADER(b0 & 0x0F, True, 0, length, mask)
            protocol.current_frame_masker = (
                _createXorMasker(mask, length) if length else _XorMaskerNull()
            )
            rest = protocol.data = data[start:]
            # An empty frame is finished even with nothing after it, as Autobahn's loop
            # goes on after an empty frame's header (its end: onMessage, the ping timeout).
            if (rest or not length) and protocol.state != _CLOSED:
                protocol.consumeData()
            return True
        # onFrameData and onFrameEnd, and the message hooks (Autobahn's, see leanFrames).
        stats.incomingOctetsWebSocketLevel += length
        stats.incomingOctetsAppLevel += length
        if checked:
            protocol.utf8validator  # noqa: B018 - made on first use, as Autobahn's is
            protocol.utf8validateLast = (True, True, length, length)
        protocol.message_data.append(payload)
        protocol.frame_data = None
        stats.incomingWebSocketFrames += 1
        if protocol.autoPingTimeoutCall and protocol.autoPingRestartOnAnyTraffic:
            protocol._cancelAutoPingTimeoutCall()
        stats.incomingWebSocketMessages += 1
        protocol.onMessage(payload, isBinary)
        if protocol._listeners is not None:
            # Someone listens since: as Autobahn's onMessageEnd tells them.
            _fireMessage(protocol, payload, isBinary)
        protocol.message_data = None
        protocol.inside_message = False
        i = end
        if protocol.state != _OPEN:
            break
    if i < size:
        _handOver(protocol, data[i:] if i else data)
    return True


def _handOver(protocol: Any, rest: bytes) -> None:
    """Leave ``rest`` to Autobahn's parser, as its own loop would go on with it."""
    protocol.data = rest
    if rest and protocol.state != _CLOSED:
        protocol.consumeData()


def _fireMessage(protocol: Any, payload: bytes, isBinary: bool) -> None:
    """Tell a connection's ``message`` listeners, as Autobahn's ``onMessageEnd`` does."""
    fired = protocol.fire("message", payload, is_binary=isBinary)

    def error(f: Any) -> None:
        protocol.log.error("Firing signal 'message' failed: {fail}", fail=f)

    _txaio.add_callbacks(fired, None, error)
