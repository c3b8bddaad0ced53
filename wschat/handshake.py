"""
Decisions taken from the opening handshake's HTTP headers: whether a browser page's ``Origin``
may connect, and who the sender is when trusted proxies stand in front of the daemon.

Origins (``--allowed-origin``)
    A handshake without ``Origin`` comes from a program, not a page, and is accepted. One with an
    ``Origin`` is accepted when that origin is the daemon's own (same-origin with the request's
    ``Host``: ``http`` for a plain connection, ``https`` for TLS; same host; same port, 80/443 when
    none is written) or is listed. ``*`` lists every origin; ``null`` lists the opaque origin that
    sandboxed frames and ``file:`` pages send. Anything else gets HTTP 403: this is what stops
    cross-site WebSocket hijacking, where a page from another site opens a socket to the daemon.

Host names (``--allowed-host``)
    A request (page, health, metrics or WebSocket handshake) is served only when its ``Host``
    names this daemon: ``localhost`` or a name under ``.localhost``, a loopback address, the
    address the connection arrived at, the machine's host name, or a name listed with
    ``--allowed-host`` (``.example.com`` lists that domain and every name under it, ``*`` lists
    every name). The port is not compared. This stops DNS rebinding, where a page on a domain
    the attacker controls re-points that domain at the daemon's address: the browser then sends
    the attacker's name as ``Host``, and the same-origin check alone would pass. A request
    without ``Host`` (HTTP/1.0 tools) is served: browsers always send one.

Forwarded senders (``--trust-forwarded-for N``)
    Each proxy appends the address it received the connection from to ``X-Forwarded-For``. With
    ``N`` trusted proxies, the last of which connects to the daemon, the client is the ``N``-th
    entry from the right: ``N=1`` takes the last entry, written by the one proxy. Entries further
    left were written by the client or untrusted hops and are never used. A header that is
    missing, shorter than ``N`` entries, or whose chosen entry is not an IP address leaves the
    sender as the TCP peer (as Werkzeug's ``ProxyFix`` does). The sender is shown as
    ``<ip>:<port>`` with the port of the TCP connection the daemon sees (the proxy's side): the
    client's own port is not in the header, and this port still tells two connections apart.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress

from wschat.wire import formatAddress, hostPort

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class Origin(NamedTuple):
    """A web origin: scheme, host and port, all normalised (``port`` is None if unknown)."""

    scheme: str
    host: str
    port: int | None


#: The opaque origin a browser sends as ``Origin: null``.
NULL_ORIGIN = Origin("null", "", None)


def parseOrigin(text: str) -> Origin:
    """
    Parse an ``Origin`` header value (``https://chat.example.com``, ``null``).

    @raise ValueError: if ``text`` is not an origin (no scheme or host, a path, a query...).
    """
    text = text.strip()
    if text.lower() == "null":
        return NULL_ORIGIN
    parts = urlsplit(text)
    host = parts.hostname
    if not parts.scheme or not host:
        raise ValueError(f"{text!r} is not an origin (scheme://host[:port])")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"{text!r} is not an origin: it has more than scheme://host[:port]")
    scheme = parts.scheme.lower()
    port = parts.port  # raises ValueError for a port that is not a number in range
    if port is None:
        port = _DEFAULT_PORTS.get(scheme)
    return Origin(scheme, host, port)


def parseHost(host: str, secure: bool) -> tuple[str, int]:
    """
    Parse a ``Host`` header value (``example.com``, ``127.0.0.1:2000``, ``[::1]:2000``) into a
    lower-case host and a port (80, or 443 when ``secure``, if none is given).

    @raise ValueError: if ``host`` is not a host with an optional port.
    """
    parts = urlsplit("//" + host.strip())
    if not parts.hostname or parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"{host!r} is not a host[:port]")
    port = parts.port
    return parts.hostname, port if port is not None else (443 if secure else 80)


def sameOrigin(origin: Origin, host: str | None, secure: bool) -> bool:
    """
    Whether a page of ``origin`` is the daemon's own site, reached at ``host`` (the request's
    ``Host`` header) over TLS when ``secure``: same scheme (``https`` with TLS, ``http``
    without), same host, same port.
    """
    if host is None or origin.scheme != ("https" if secure else "http"):
        return False
    try:
        return (origin.host, origin.port) == parseHost(host, secure)
    except ValueError:
        return False


@dataclass(frozen=True)
class OriginPolicy:
    """
    Which pages may open a connection: the daemon's own origin, plus ``allowed``; or all.

    The default policy allows only the daemon's own origin (and clients that send none).
    """

    allowed: frozenset[Origin] = frozenset()
    allowAll: bool = False

    @classmethod
    def fromList(cls, origins: Iterable[str]) -> OriginPolicy:
        """
        The policy for ``--allowed-origin`` values: origins, ``null``, or ``*`` for all.

        @raise ValueError: if a value is none of these.
        """
        allowed = set()
        allowAll = False
        for text in origins:
            if text.strip() == "*":
                allowAll = True
            else:
                allowed.add(parseOrigin(text))
        return cls(frozenset(allowed), allowAll)

    def allows(self, origin: str | None, host: str | None, secure: bool) -> bool:
        """
        Whether a handshake with this ``Origin`` (None or empty: no header) may connect to the
        daemon reached at ``host`` (the ``Host`` header), over TLS when ``secure``.
        """
        if not origin or self.allowAll:
            return True
        try:
            parsed = parseOrigin(origin)
        except ValueError:
            return False
        return parsed in self.allowed or sameOrigin(parsed, host, secure)


def _canonicalName(name: str) -> str:
    """A host name or address as :class:`HostPolicy` compares it: lower case, no final dot,
    an IP address in canonical form."""
    name = name.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def _isAddress(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _hostName(host: str) -> str:
    """
    The name in a ``Host`` header, without its port, in canonical form. An IPv6 address
    without brackets (``::1:2000``, as Autobahn's client writes it) is taken as address and
    port when it has a port, else as an address.

    @raise ValueError: if ``host`` is not a host with an optional port.
    """
    host = host.strip()
    if host.count(":") > 1 and not host.startswith("["):
        address, _, port = host.rpartition(":")
        if port.isdigit() and _isAddress(address):
            return _canonicalName(address)
        if _isAddress(host):
            return _canonicalName(host)
        raise ValueError(f"{host!r} is not a host[:port]")
    return _canonicalName(parseHost(host, False)[0])


def machineNames() -> frozenset[str]:
    """The machine's own host name (as ``hostname`` prints it), in canonical form."""
    name = socket.gethostname()
    return frozenset({_canonicalName(name)}) if name else frozenset()


@dataclass(frozen=True)
class HostPolicy:
    """
    Which ``Host`` values name this daemon: its own names (see the module docstring), plus
    ``allowed`` names, names under ``domains`` (each with its leading dot), or all.
    """

    allowed: frozenset[str] = frozenset()
    domains: tuple[str, ...] = ()
    allowAll: bool = False
    own: frozenset[str] = frozenset()
    # The answers for the Host values (and, for an address that is not the daemon's by
    # itself, (Host, local address) pairs) seen lately: clients of one daemon send a handful
    # of distinct Host values, and working one out costs a handshake ~13 us.
    _answers: dict[str | tuple[str, str | None], object] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    @classmethod
    def fromList(cls, hosts: Iterable[str], own: Iterable[str] | None = None) -> HostPolicy:
        """
        The policy for ``--allowed-host`` values: names, addresses, ``.domain``, or ``*``;
        ``own`` is the machine's names (default: :func:`machineNames`).

        @raise ValueError: if a value is none of these.
        """
        allowed: set[str] = set()
        domains: list[str] = []
        allowAll = False
        for text in hosts:
            text = text.strip()
            if text == "*":
                allowAll = True
                continue
            name = _canonicalName(text.lstrip("."))
            if not (_HOST_NAME.match(name) or _isAddress(name)):
                raise ValueError(f"{text!r} is not a host name (chat.example.com, .example.com, *)")
            if text.startswith("."):
                domains.append("." + name)
            else:
                allowed.add(name)
        names = machineNames() if own is None else frozenset(_canonicalName(n) for n in own)
        return cls(frozenset(allowed), tuple(domains), allowAll, names)

    def allows(
        self, host: str | None, local: IAddress | Callable[[], IAddress] | None = None
    ) -> bool:
        """
        Whether a request with this ``Host`` header (None: none) names this daemon, on a
        connection that arrived at the address ``local`` (or the address a call of ``local``
        gives: asked only when the answer depends on it).

        @raise ValueError: if ``host`` is not a host with an optional port.
        """
        if host is None:
            return True
        answers = self._answers
        answer = answers.get(host)
        if answer is None:
            byName = self._byName(host)
            answer = _BY_ADDRESS if byName is None else byName
            self._keep(host, answer)
        if answer is not _BY_ADDRESS:
            return bool(answer)
        # An address: the daemon's if the connection arrived at it.
        if callable(local):
            local = local()
        key = (host, local.host if isinstance(local, IPv4Address | IPv6Address) else None)
        answer = answers.get(key)
        if answer is None:
            answer = self._isLocal(host, local)
            self._keep(key, answer)
        return bool(answer)

    def _keep(self, key: str | tuple[str, str | None], answer: object) -> None:
        if len(self._answers) >= _ANSWERS_KEPT:
            self._answers.clear()
        self._answers[key] = answer

    def _byName(self, host: str) -> bool | None:
        # Whether the Host names this daemon whatever address the connection arrived at;
        # None for an address that does only if it is that one.
        name = _hostName(host)
        if not (_HOST_NAME.match(name) or _isAddress(name)):
            raise ValueError(f"{host!r} is not a host name or address")
        if self.allowAll:
            return True
        if name == "localhost" or name.endswith(".localhost"):
            return True
        if name in self.allowed or name in self.own:
            return True
        if any(name == d[1:] or name.endswith(d) for d in self.domains):
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False
        if ip.is_loopback:
            return True
        return None

    def _isLocal(self, host: str, local: IAddress | None) -> bool:
        # Whether the address in the Host is the one the connection arrived at.
        if isinstance(local, IPv4Address | IPv6Address):
            try:
                ip = ipaddress.ip_address(_hostName(host))
                return ip == ipaddress.ip_address(local.host.split("%", 1)[0])
            except ValueError:
                return False
        return False


#: A Host answer that depends on the address the connection arrived at.
_BY_ADDRESS = object()

#: How many Host (and Host, local address) answers a HostPolicy keeps.
_ANSWERS_KEPT = 256

#: A DNS name: letters, digits, hyphens and underscores in dot-separated labels.
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")

#: An endpoint description's ``interface=`` argument (``\:`` escapes a colon).
_INTERFACE = re.compile(r"(?:^|:)interface=((?:\\.|[^:\\])*)")


def listensOnLoopbackOnly(description: str) -> bool:
    """
    Whether a ``--listen`` endpoint description is a TCP or TLS port on a loopback interface
    (``tcp:2000:interface=127.0.0.1``): reached by nothing but this machine.
    """
    kind = description.split(":", 1)[0].strip().lower()
    match = _INTERFACE.search(description)
    if kind not in ("tcp", "tcp6", "ssl") or match is None:
        return False
    interface = re.sub(r"\\(.)", r"\1", match.group(1))
    if interface.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def _parseForwardedEntry(entry: str) -> str | None:
    """
    The IP address in one ``X-Forwarded-For`` entry (``203.0.113.7``, ``2001:db8::1``,
    ``[2001:db8::1]:4711``, ``203.0.113.7:4711``), in canonical form; None if it has none.
    """
    entry = entry.strip()
    if entry.startswith("["):
        entry, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    elif entry.count(":") == 1:
        entry, _, port = entry.partition(":")
        if not port.isdigit():
            return None
    try:
        return str(ipaddress.ip_address(entry))
    except ValueError:
        return None


def forwardedClient(header: str | None, trustedHops: int) -> str | None:
    """
    The client's IP address according to ``X-Forwarded-For`` when the nearest ``trustedHops``
    proxies are trusted: the ``trustedHops``-th entry from the right. None when the header does
    not say (missing, too short, not an IP address there) or when no hop is trusted.
    """
    if trustedHops < 1 or not header:
        return None
    entries = header.split(",")
    if len(entries) < trustedHops:
        return None
    return _parseForwardedEntry(entries[-trustedHops])


def senderAddress(peer: IAddress, client: str | None) -> str:
    """
    Name the sender as the prefix shows it: the forwarded client address (what
    :func:`forwardedClient` found) with the TCP peer's port (``203.0.113.7:51234``,
    ``[2001:db8::1]:51234``; no port behind a UNIX socket), or, when the header is not trusted
    or does not say (``client`` is None), the TCP peer itself.
    """
    if client is None:
        return formatAddress(peer)
    if isinstance(peer, IPv4Address | IPv6Address):
        return hostPort(client, peer.port)
    # No port behind a UNIX socket; an IPv6 address is still bracketed, as with a port.
    return f"[{client}]" if ":" in client else client
