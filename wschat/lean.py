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
"""

from __future__ import annotations

import types
from typing import Any

_MISSING = object()


def protocolClass(factory: Any) -> type:
    """The protocol class for ``factory``'s next connection."""
    base = factory.protocol
    names = getattr(base, "CONFIG_ATTRS", ())
    values = tuple(getattr(factory, name, _MISSING) for name in names)
    cached = factory.__dict__.get("_leanProtocol")
    if cached is not None and cached[0] is base and cached[1] == values:
        return cached[2]  # type: ignore[no-any-return]
    namespace: dict[str, Any] = {
        # A function stored on a class would become a method: keep it a plain value.
        n: staticmethod(v) if isinstance(v, types.FunctionType) else v
        for n, v in zip(names, values, strict=True)
        if v is not _MISSING
    }
    namespace["__module__"] = base.__module__
    namespace["__qualname__"] = base.__qualname__
    subclass = type(base.__name__, (base,), namespace)
    factory._leanProtocol = (base, values, subclass)
    return subclass
