"""Process tuning for many connections: open files, the listen backlog, the garbage collector."""

from __future__ import annotations

import gc
import resource

import pytest

from wschat import tap
from wschat.tap import Options, buildServer, makeService
from wschat.tuning import raiseFileLimit, withBacklog


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:2000:interface=127.0.0.1", "tcp:2000:interface=127.0.0.1:backlog=4096"),
        ("tcp6:2000", "tcp6:2000:backlog=4096"),
        ("ssl:2443:privateKey=k.pem", "ssl:2443:privateKey=k.pem:backlog=4096"),
        ("tcp:2000:backlog=10", "tcp:2000:backlog=10"),
        ("unix:/run/x.sock", "unix:/run/x.sock"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_tcp_listeners_get_a_deep_backlog(description, expected):
    """TCP and TLS listeners naming no backlog get one sized for reconnect storms."""
    assert withBacklog(description) == expected


def test_file_limit_is_raised_never_lowered():
    """The soft limit ends at least as high as it was and at most the hard limit in force."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = raiseFileLimit(before[0] + 1)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
    assert soft >= before[0]
    assert soft == before[0] + 1 or soft == hard
    assert raiseFileLimit(1) == (soft, hard)


def test_daemon_start_freezes_what_exists():
    """makeService leaves the objects alive at start out of the collector's full passes."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    options = Options()
    options.parseOptions(["--port", "0"])
    makeService(options)
    assert gc.get_freeze_count() > 1000
    gc.unfreeze()


def test_daemon_start_raises_the_file_limit(monkeypatch):
    """makeService, the twistd start path, raises the open-file limit for many connections."""
    raised = []
    monkeypatch.setattr(tap, "raiseFileLimit", lambda: raised.append(True))
    options = Options()
    options.parseOptions(["--port", "0"])
    makeService(options)
    gc.unfreeze()
    assert raised == [True]


def test_building_the_server_leaves_the_process_alone(monkeypatch):
    """buildServer (tests, embedding programs) neither freezes the collector nor touches limits."""
    gc.unfreeze()
    monkeypatch.setattr(tap, "raiseFileLimit", lambda: pytest.fail("file limit raised"))
    options = Options()
    options.parseOptions(["--port", "0"])
    buildServer(options)
    assert gc.get_freeze_count() == 0
