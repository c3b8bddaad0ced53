"""The load tool against a real daemon over loopback: short runs that must lose nothing."""

from __future__ import annotations

import json
import os
import sys

import pytest_twisted
from redisserver import RedisServer, waitFor
from twisted.internet import utils

from wschat.redisbus import RedisBus


async def bench(*args: str) -> dict:
    """Run ``python -m wschat.bench ... --json`` in a subprocess; its one run's result."""
    # Run from /: the installed package is tested, not the checkout on the path.
    out, err, code = await utils.getProcessOutputAndValue(
        sys.executable,
        ["-m", "wschat.bench", *args, "--json", "--quiet"],
        env=dict(os.environ),
        path="/",
    )
    assert code == 0, err.decode()
    (run,) = json.loads(out)["runs"]
    return run


#: A short closed-loop run: 20 clients, 2 messages in flight per sender, half a second.
SHORT_RUN = (
    "--clients", "20", "--inflight", "2", "--duration", "0.5", "--warmup", "0.1",
    "--processes", "2",
)  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_throughput_run_loses_nothing(daemon):
    """A closed-loop run of a few hundred messages through the raw daemon: all arrive, in order."""
    service, url = daemon("--format", "raw", "--welcome", "", "--no-message-log")
    run = await bench(
        "throughput",
        "--url",
        url,
        *SHORT_RUN,
        "--senders",
        "3",
        "--pid",
        str(os.getpid()),
    )
    assert run["connected"] == 20
    assert run["sent_total"] >= 100
    assert (run["lost"], run["reordered"], run["duplicated"], run["dropped"]) == (0, 0, 0, 0)
    assert run["deliveries_per_s"] > 0 and run["latency_ms"]["samples"] > 0
    assert run["verified_clients"] == 20


@pytest_twisted.ensureDeferred
async def test_rate_run_against_prefixed_daemon(daemon):
    """Against the prefixed daemon with a greeting, the marker is found after the prefix."""
    service, url = daemon("--no-message-log")
    run = await bench(
        "rate",
        "--url",
        url,
        "--clients",
        "10",
        "--senders",
        "2",
        "--rate",
        "400",
        "--duration",
        "0.5",
        "--warmup",
        "0.1",
        "--verify",
        "3",
    )
    assert run["connected"] == 10
    assert 100 <= run["sent_total"] <= 300
    assert (run["lost"], run["reordered"], run["duplicated"]) == (0, 0, 0)
    assert run["verified_clients"] == 5


@pytest_twisted.ensureDeferred
async def test_idle_run_reports_rss_and_handshakes(daemon):
    """Idle mode holds the connections and, given the server's pid, reports RSS per connection."""
    service, url = daemon("--welcome", "")
    run = await bench(
        "idle", "--url", url, "--clients", "50", "--duration", "0.2", "--pid", str(os.getpid())
    )
    assert (run["connected"], run["held"], run["dropped"]) == (50, 50, 0)
    assert run["handshakes_per_s"] > 0
    assert "rss_per_connection" in run


@pytest_twisted.ensureDeferred
async def test_spread_run_over_two_daemons_sharing_redis(daemon):
    """--spread over two daemons of one Redis room: every client gets every sender's messages."""
    server = RedisServer()
    await server.start()
    try:
        daemons = [
            daemon("--format", "raw", "--welcome", "", "--no-message-log", "--redis", server.url)
            for _ in range(2)
        ]
        buses = [service.bus for service, _ in daemons]
        assert all(isinstance(b, RedisBus) for b in buses)
        await waitFor(lambda: all(b.available for b in buses))
        run = await bench(
            "throughput",
            "--spread",
            *(arg for _, url in daemons for arg in ("--url", url)),
            *SHORT_RUN,
            "--senders",
            "4",
            "--verify",
            "all",
        )
        assert (run["daemons"], run["connected"]) == (2, 20)
        assert run["sent_total"] >= 100
        assert (run["lost"], run["reordered"], run["duplicated"], run["dropped"]) == (0, 0, 0, 0)
        assert run["verified_clients"] == 20 and run["latency_ms"]["samples"] > 0
        # Both daemons had senders, and each relayed every message sent, not just its own.
        assert all(b.published > 0 for b in buses)
        assert sum(b.published for b in buses) == run["sent_total"]
        assert [b.received for b in buses] == [run["sent_total"]] * 2
    finally:
        await server.stop()
        server.cleanup()
