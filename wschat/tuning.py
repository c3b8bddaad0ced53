"""
Process tuning for many connections: open files (one per connection), the listen backlog, and
the cyclic garbage collector's pauses.
"""

from __future__ import annotations

import gc
import resource

#: Open files the daemon asks for: a connection is a file, and 20,000 of them must fit.
WANTED_FILES = 65536

#: Pending connections a TCP listener keeps while the reactor catches up (a reconnect storm).
#: Twisted's default is 50; Linux caps the value at net.core.somaxconn.
LISTEN_BACKLOG = 4096


def raiseFileLimit(wanted: int = WANTED_FILES) -> tuple[int, int]:
    """
    Raise RLIMIT_NOFILE's soft limit to ``wanted`` (raising the hard limit too where the
    process may, as root may); otherwise to the hard limit. Never lowers it.

    Returns the (soft, hard) limits in force afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft, hard
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted, wanted
        except (OSError, ValueError):
            pass
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, hard
        return target, hard
    return soft, hard


def withBacklog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """
    ``description`` with a listen backlog added, if it is a TCP or TLS endpoint naming none.
    """
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in ("tcp", "tcp6", "ssl") or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def freezeStartupObjects() -> None:
    """
    Put everything alive at start (modules, classes, functions, the service tree) out of the
    cyclic garbage collector's reach, so a full collection walks only what connections add.

    Measured: with 1000 clients, 60,000 of the 80,000 objects the collector tracks are there
    from start, and the full collection that a burst of connections triggers paused the
    daemon for 45 ms, every client's delivery waiting on it: that pause was the p99 latency.
    Objects frozen here live as long as the process anyway.
    """
    gc.collect()
    gc.freeze()
