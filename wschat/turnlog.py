"""
The connections' log lines, emitted together at the end of each reactor turn.

A reconnect storm makes thousands of connection lines a second. Emitted one at a time, between
handshakes, each line runs Twisted's whole logging path (the event, the observers, the text
formatting of ``twistd``'s log file) with cold caches, and costs about as much as a third of a
handshake. :class:`TurnLog` keeps each line's event, with the time it happened, and hands the
events of a turn to the logger's observer one after another once the turn's work is done;
emitted in a row they cost a fraction of that.

Nothing else changes: each line is still its own event, with its own format, fields and
``log_time`` (the time of what it reports, not of its emission), in the order the lines were
made. What a turn kept is emitted at the turn's end (``callLater(0)``), at the reactor's
shutdown, when anything calls :meth:`TurnLog.flush` (the daemon does before its own shutdown
line) and, should the process end without its reactor stopping (an uncaught exception), at
interpreter exit.
"""

from __future__ import annotations

import atexit
import time
import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

#: Every TurnLog with lines kept, for the exit hook.
_unflushed: weakref.WeakSet[TurnLog] = weakref.WeakSet()


@atexit.register
def _flushAtExit() -> None:
    for lines in list(_unflushed):
        lines.flush()


class TurnLog:
    """
    Log lines kept to the end of the reactor turn they were made in.

    @param clock: the reactor whose turns end a batch.
    @param now: the time stamped on each line when it is made.
    """

    def __init__(self, clock: IReactorTime, now: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._now = now
        self._kept: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self._kept)

    def info(self, log: Logger, format: str, **fields: Any) -> None:
        """
        Log ``format`` with ``fields`` at level info through ``log`` (as ``log.info`` would,
        stamped now) at the end of this turn. A ``log_source`` field names the source when
        ``log``'s is not the one.
        """
        event = fields
        event["log_logger"] = log
        event["log_level"] = LogLevel.info
        event["log_namespace"] = log.namespace
        if "log_source" not in event:
            event["log_source"] = log.source
        event["log_format"] = format
        event["log_time"] = self._now()
        if not self._kept:
            self._clock.callLater(0, self.flush)
            _unflushed.add(self)
        self._kept.append(event)

    def flush(self) -> None:
        """Emit every line kept, in the order they were made."""
        kept, self._kept = self._kept, []
        _unflushed.discard(self)
        for event in kept:
            event["log_logger"].observer(event)
