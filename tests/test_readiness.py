"""
Liveness (/healthz) and readiness (/readyz) of a real daemon, on the chat port and on the
--metrics-listen site, with a real redis-server going away and coming back.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from rawws import RawClient, rawConnect
from redisserver import RedisServer, waitFor
from twisted.internet import defer, reactor
from twisted.web.client import Agent, readBody

from wschat.redisbus import RedisBus
from wschat.testing import closeAll, connect, startDaemon

# Twisted's readBody warns about the proxy transport its own Agent hands it.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")


async def get(url: str) -> tuple[int, dict]:
    """GET ``url``: the status code and the JSON body."""
    response = await Agent(reactor).request(b"GET", url.encode("ascii"))
    return response.code, json.loads(await readBody(response))


def sites(service, url: str) -> list[str]:
    """The chat port's and the --metrics-listen site's http:// roots."""
    assert service.metricsEndpoint is not None and service.metricsEndpoint.port is not None
    metricsPort = service.metricsEndpoint.port.getHost().port
    return [url.replace("ws://", "http://", 1), f"http://127.0.0.1:{metricsPort}"]


@pytest_twisted.ensureDeferred
async def test_readyz_ready_on_both_sites(daemon):
    """A daemon of its own answers /readyz 200 "ready" on the chat port and the metrics site."""
    service, url = daemon("--metrics-listen", "tcp:0:interface=127.0.0.1")
    client = await connect(url)
    await client.nextText()
    for root in sites(service, url):
        assert await get(root + "/readyz") == (200, {"status": "ready", "connections": 1})
    await closeAll([client])


@pytest_twisted.ensureDeferred
async def test_readyz_follows_the_redis_link(daemon):
    """
    /readyz is 503 "Redis link down" while redis-server is gone and 200 once it is back;
    /healthz (liveness) stays 200 throughout.
    """
    redis = RedisServer()
    await redis.start()
    try:
        service, url = daemon("--redis", redis.url, "--metrics-listen", "tcp:0:interface=127.0.0.1")
        bus = service.bus
        assert isinstance(bus, RedisBus)
        await waitFor(lambda: bus.available)
        roots = sites(service, url)
        for root in roots:
            assert await get(root + "/readyz") == (200, {"status": "ready", "connections": 0})

        await redis.stop()
        await waitFor(lambda: not bus.available)
        for root in roots:
            assert await get(root + "/readyz") == (
                503,
                {"status": "unready", "reason": "Redis link down", "connections": 0},
            )
            assert (await get(root + "/healthz"))[0] == 200

        await redis.start()
        await waitFor(lambda: bus.available)
        for root in roots:
            assert (await get(root + "/readyz"))[0] == 200
    finally:
        await redis.stop()
        redis.cleanup()


@pytest_twisted.ensureDeferred
async def test_readyz_503_while_shutting_down():
    """Once the daemon is stopping, /readyz on a connection still open answers 503."""
    service, url = startDaemon(["--welcome", ""])
    request = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    http = await rawConnect(url, RawClient(request))
    first = await http.until(lambda data: b"}\n" in data)
    assert first.startswith(b"HTTP/1.1 200 ")
    stopped = defer.maybeDeferred(service.stopService)
    assert http.transport is not None
    http.transport.write(request)
    answers = await http.until(lambda data: data.count(b"}\n") == 2)
    second = answers[len(first) :]
    head, body = second.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 ")
    assert json.loads(body) == {"status": "unready", "reason": "shutting down", "connections": 0}
    http.transport.loseConnection()
    await stopped


@pytest_twisted.ensureDeferred
async def test_probes_left_out_of_access_log(daemon, logged):
    """/readyz and /healthz polls are not written to the access log; the page is."""
    service, url = daemon()
    root = url.replace("ws://", "http://", 1)
    await get(root + "/readyz")
    await get(root + "/healthz")
    response = await Agent(reactor).request(b"GET", (root + "/").encode("ascii"))
    await readBody(response)
    requests = [line for line in logged if '"GET /' in line]
    assert len(requests) == 1 and '"GET / HTTP/1.1"' in requests[0]
