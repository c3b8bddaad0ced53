"""What a real daemon logs when it starts, serves and stops: counts in agreement, no noise."""

from __future__ import annotations

import re

import pytest_twisted
from twisted.internet import defer

from wschat.testing import connect, startDaemon


@pytest_twisted.ensureDeferred
async def test_stop_logs_one_connection_in_the_singular(logged):
    """Stopping with one client open logs "closing 1 connection", not "1 connections"."""
    service, url = startDaemon(["--metrics-listen", "tcp:0:interface=127.0.0.1"])
    client = await connect(url)
    await client.nextText()
    await defer.maybeDeferred(service.stopService)
    await client.closed
    assert any("closing 1 connection (1001 going away)" in line for line in logged), logged
    # Nor do our factories announce themselves: the server logs where it listens.
    # (The test's own client factory, in wschat.testing, may.)
    ours = re.compile(r"(Starting|Stopping) factory <wschat\.(dispatch|protocol|web|server)\.")
    assert not [line for line in logged if ours.search(line)]
    assert sum("listening on" in line for line in logged) == 2
