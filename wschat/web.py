"""
The daemon's HTTP side: one Twisted web site per daemon that serves the chat page, ``/healthz``,
``/readyz`` and ``/metrics``. WebSocket handshakes, on any path, go to the room before they get here
(:mod:`wschat.dispatch`).

Resources on the chat port::

    GET /            the chat page (wschat/static/index.html), and its chat.js and chat.css
    GET /healthz     liveness: 200 {"status": "ok", "connections": N} while the process serves;
                     503 "stopping" once shutting down
    GET /readyz      readiness: 200 {"status": "ready", "connections": N} while the room relays;
                     503 {"status": "unready", "reason": ...} while the Redis link is down or
                     the daemon is shutting down
    GET /metrics     Prometheus exposition (unless moved by --metrics-listen, or --no-metrics)
    Upgrade: websocket, any path:  the chat room

The page is package data, read once at start-up and served from memory.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import TYPE_CHECKING, cast

from prometheus_client.twisted import MetricsResource
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.pages import errorPage, notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from wschat.limits import MAX_REQUEST_HEAD

if TYPE_CHECKING:
    from wschat.server import ChatServer

#: The page and its assets: (file in wschat/static, URL path segment, media type).
ASSETS = [
    ("index.html", b"", "text/html; charset=utf-8"),
    ("chat.js", b"chat.js", "text/javascript; charset=utf-8"),
    ("chat.css", b"chat.css", "text/css; charset=utf-8"),
]

#: The page needs nothing but its own files and a WebSocket back to where it came from
#: (CSP 3: 'self' in connect-src covers ws: and wss: to the page's own host and port).
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

#: Seconds an idle HTTP connection (keep-alive between page loads) is kept.
HTTP_IDLE_TIMEOUT = 60

#: Paths polled by machines, left out of the access log.
QUIET_PATHS = frozenset({b"/healthz", b"/readyz", b"/metrics"})


class Root(Resource):
    """A site's root: its children, and a plain 404 for anything else."""

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        return notFound()


class ReadOnly(Resource):
    """
    A leaf answering GET (:meth:`render_GET`) and HEAD, and 405 to any other method.

    HEAD is GET without the body, whose length is still announced. (Twisted's own fallback
    returns the body and has the request drop it, logging a warning on every HEAD: a load
    balancer probing ``/healthz`` with HEAD would fill the log.)
    """

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        if request.method == b"HEAD":
            body = self.render_GET(request)
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        if request.method != b"GET":
            request.setHeader(b"allow", b"GET, HEAD")
            page = errorPage(405, "Method Not Allowed", "This resource is read-only.")
            return cast(bytes, page.render(request))
        return self.render_GET(request)

    def render_GET(self, request: IRequest) -> bytes:
        raise NotImplementedError


class Asset(ReadOnly):
    """
    One file of the page, served from memory with headers that keep it to itself.

    (Like ``twisted.web.static.Data``, whose module warns of deprecations when imported.)
    """

    def __init__(self, data: bytes, mediaType: str) -> None:
        super().__init__()
        self.data = data
        self.mediaType = mediaType.encode("ascii")

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", self.mediaType)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
        return self.data


def _status(request: IRequest, body: dict[str, object]) -> bytes:
    """A health check's answer: ``body`` as JSON, never cached."""
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8") + b"\n"


class HealthResource(ReadOnly):
    """
    ``GET /healthz``: 200 and a small JSON body while the daemon accepts connections,
    503 once it is stopping.
    """

    def __init__(self, server: ChatServer) -> None:
        super().__init__()
        self._server = server

    def render_GET(self, request: IRequest) -> bytes:
        if self._server.accepting():
            status = "ok"
        else:
            status = "stopping"
            request.setResponseCode(503)
        return _status(request, {"status": status, "connections": len(self._server.room)})


class ReadinessResource(ReadOnly):
    """
    ``GET /readyz``: 200 while the room can relay messages; 503, and why, while it cannot (the
    Redis link is down, or the daemon is shutting down). A load balancer sends new clients only
    to a ready daemon; ``/healthz`` says whether the process is alive at all.
    """

    def __init__(self, server: ChatServer) -> None:
        super().__init__()
        self._server = server

    def render_GET(self, request: IRequest) -> bytes:
        reason = self._server.unready()
        body: dict[str, object] = {"status": "ready" if reason is None else "unready"}
        if reason is not None:
            body["reason"] = reason
            request.setResponseCode(503)
        body["connections"] = len(self._server.room)
        return _status(request, body)


class ChatChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel that takes request heads up to :data:`MAX_REQUEST_HEAD`, as the
    dispatcher in front of it does for WebSocket handshakes (Twisted's own limit is 16 KiB,
    past which it closes without an answer); larger ones get 431 from the dispatcher.
    """

    MAX_LENGTH = MAX_REQUEST_HEAD
    totalHeadersSize = MAX_REQUEST_HEAD


class ChatSite(Site):
    """
    A :class:`Site` that leaves health checks and metric scrapes out of the access log, and
    speaks HTTP/1.1 only (no HTTP/2: the dispatcher names http/1.1 for ALPN).
    """

    protocol = ChatChannel  # type: ignore[assignment]

    # No "Starting factory" line at start: the server logs where it listens.
    noisy = False

    def log(self, request: http.Request) -> None:
        if request.path in QUIET_PATHS:
            return
        super().log(request)


def _asset(name: str, mediaType: str) -> Asset:
    return Asset((files("wschat") / "static" / name).read_bytes(), mediaType)


def makeSite(server: ChatServer, metrics: bool = True) -> ChatSite:
    """
    The site for the chat port: page, health, metrics (when ``metrics``). WebSocket
    handshakes never reach it: :mod:`wschat.dispatch` sends them to the room first.
    """
    root = Root()
    for name, path, mediaType in ASSETS:
        root.putChild(path, _asset(name, mediaType))
    return _monitoredSite(root, server, metrics)


def makeMetricsSite(server: ChatServer) -> ChatSite:
    """
    The site for ``--metrics-listen``: ``/metrics``, ``/healthz`` and ``/readyz`` only.
    """
    return _monitoredSite(Root(), server, metrics=True)


def _monitoredSite(root: Root, server: ChatServer, metrics: bool) -> ChatSite:
    """``root`` with ``/healthz``, ``/readyz`` and (when ``metrics``) ``/metrics``, as a site."""
    root.putChild(b"healthz", HealthResource(server))
    root.putChild(b"readyz", ReadinessResource(server))
    if metrics:
        root.putChild(b"metrics", MetricsResource(server.metrics.registry))
    return ChatSite(root, timeout=HTTP_IDLE_TIMEOUT)
