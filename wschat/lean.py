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
"""

from __future__ import annotations

import operator
import types
from collections import deque
from typing import Any

_MISSING = object()


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
