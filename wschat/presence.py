"""
Room-wide presence: how many connections the room's other daemons have, as this daemon knows.

Each daemon reports its own count (on each join or leave, and at each heartbeat) and renews a
key in Redis that lives ``ttl`` seconds; a report or a census that finds a daemon's key alive
counts that daemon until the key would expire. A daemon that stops reporting (it died without
saying goodbye) therefore drops out of the count at most ``ttl`` seconds after its last report,
whoever looks.

Reports come by two ways, the channel (presence envelopes) and the census a heartbeat reads
back, in no fixed order between them: each report carries a version that grows with each
report of its daemon, and the highest wins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from wschat.redishistory import Alive


class _Node:
    __slots__ = ("version", "count", "until", "heard")

    def __init__(self, version: int, count: int, until: float, heard: float) -> None:
        self.version = version
        self.count = count
        #: Counted until then (its alive key expires then, or it said goodbye: now).
        self.until = until
        #: When it was last heard from on the channel.
        self.heard = heard


class PresenceView:
    """
    The other daemons of a room and their connection counts.

    @param node: this daemon's name (never counted here: its count is the room's own).
    @param ttl: seconds a daemon counts for after a report from it.
    @param clock: the current time in seconds (``reactor.seconds``).
    """

    def __init__(self, node: str, ttl: float, clock: Callable[[], float]) -> None:
        self.node = node
        self.ttl = ttl
        self._clock = clock
        self._nodes: dict[str, _Node] = {}

    def elsewhere(self) -> int:
        """The connections of the other daemons still counted."""
        now = self._clock()
        return sum(n.count for n in self._nodes.values() if n.until > now)

    def nodes(self) -> dict[str, int]:
        """The other daemons still counted, and their counts."""
        now = self._clock()
        return {name: n.count for name, n in self._nodes.items() if n.until > now}

    def heard(self, node: str, version: int, count: int) -> bool:
        """
        ``node`` reported ``count`` connections (0: it is leaving), on the channel: true if
        that is news (newer than what is known of it).
        """
        if node == self.node:
            return False
        now = self._clock()
        known = self._nodes.get(node)
        if known is not None and known.version >= version:
            return False
        until = now + self.ttl if count else now
        self._nodes[node] = _Node(version, count, until, now)
        return True

    def counted(self, node: str, count: int) -> None:
        """``node`` had ``count`` connections after one of the events of its latest report."""
        known = self._nodes.get(node)
        if known is not None:
            known.count = count

    def census(self, alive: Iterable[Alive], asked: float) -> None:
        """
        What Redis holds, read by a census sent at ``asked``: the daemons whose keys live, with
        their latest stored reports. A daemon it does not list is gone, unless heard from on
        the channel since ``asked`` (its report then came after the census was taken).
        """
        now = self._clock()
        listed = set()
        for found in alive:
            if found.node == self.node:
                continue
            listed.add(found.node)
            known = self._nodes.get(found.node)
            until = now + found.left
            if known is None or found.version > known.version:
                self._nodes[found.node] = _Node(found.version, found.count, until, asked)
            elif known.count:
                known.until = max(known.until, until)
        for name in [n for n, known in self._nodes.items() if n not in listed]:
            if self._nodes[name].heard < asked:
                del self._nodes[name]
        # Gone for good: daemons counted for nothing any more.
        for name in [n for n, known in self._nodes.items() if known.until <= now]:
            if name not in listed:
                del self._nodes[name]

    def clear(self) -> None:
        """Forget every other daemon (this one left the room)."""
        self._nodes.clear()
