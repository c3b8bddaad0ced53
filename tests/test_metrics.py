"""Prometheus metrics: what the daemon counts, and where /metrics is served."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, readBody

from wschat.metrics import Metrics
from wschat.testing import connect
from wschat.wire import JSON_SUBPROTOCOL

# Twisted's readBody warns about the proxy transport its own Agent hands it.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")

WELCOME = "Welcome to chat! Type a message"


async def get(url: str) -> tuple[int, bytes]:
    response = await Agent(reactor).request(b"GET", url.encode("ascii"))
    return response.code, await readBody(response)


def samples(exposition: bytes) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition: {(name, sorted labels): value}."""
    found = {}
    for family in text_string_to_metric_families(exposition.decode("utf-8")):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(service, name: str, **labels: str) -> float | None:
    return service.metrics.registry.get_sample_value(name, labels)


class MetricsTests(SynchronousTestCase):
    """The Metrics object alone."""

    def test_registriesAreSeparate(self):
        """Two Metrics count apart: each has its own registry, not the global one."""
        a, b = Metrics(), Metrics()
        a.messageReceived()
        a.connectionOpened()
        self.assertEqual(a.registry.get_sample_value("wschat_messages_received_total"), 1)
        self.assertEqual(b.registry.get_sample_value("wschat_messages_received_total"), 0)
        self.assertEqual(b.registry.get_sample_value("wschat_connections_open"), 0)

    def test_limitHooks(self):
        """The hooks for limits count drops and refusals by reason."""
        m = Metrics()
        m.clientDropped()
        m.messageRefused("binary")
        m.messageRefused("binary")
        m.messageRefused("rate limit")
        get = m.registry.get_sample_value
        self.assertEqual(get("wschat_clients_dropped_total"), 1)
        self.assertEqual(get("wschat_messages_refused_total", {"reason": "binary"}), 2)
        self.assertEqual(get("wschat_messages_refused_total", {"reason": "rate limit"}), 1)

    def test_closeCodes(self):
        """Closed connections are counted by close code: no code is 'none', codes past the
        registered 1000-1015 are 'other'."""
        m = Metrics()
        for code in (1000, 1000, None, 1015, 1016, 3000, 4999):
            m.connectionOpened()
            m.connectionClosed(code)
        get = m.registry.get_sample_value
        self.assertEqual(get("wschat_connections_closed_total", {"code": "1000"}), 2)
        self.assertEqual(get("wschat_connections_closed_total", {"code": "1015"}), 1)
        self.assertEqual(get("wschat_connections_closed_total", {"code": "other"}), 3)
        self.assertEqual(get("wschat_connections_closed_total", {"code": "none"}), 1)
        self.assertEqual(get("wschat_connections_open"), 0)
        self.assertEqual(get("wschat_connections_opened_total"), 7)


@pytest_twisted.ensureDeferred
async def test_daemon_counts_connections_messages_and_frames(daemon):
    """Connections, messages, frames and bytes are counted as clients come, talk and go."""
    service, url = daemon()
    watcher = await connect(url, protocols=[JSON_SUBPROTOCOL])
    welcome = (await watcher.messages.get())[0]
    a = await connect(url)
    assert await a.nextText() == WELCOME
    joined = (await watcher.messages.get())[0]

    a.sendText("one")
    line = (await a.nextText()).encode()
    relayed = (await watcher.messages.get())[0]
    assert value(service, "wschat_connections_open") == 2
    assert value(service, "wschat_connections_opened_total") == 2
    assert value(service, "wschat_messages_received_total") == 1
    assert value(service, "wschat_messages_broadcast_total") == 1
    # welcome object + welcome text + join event + the message to each.
    assert value(service, "wschat_frames_delivered_total") == 5
    sent = len(welcome) + len(WELCOME) + len(joined) + len(line) + len(relayed)
    assert value(service, "wschat_sent_bytes_total") == sent

    a.sendClose(1000)
    await a.closed
    left = (await watcher.messages.get())[0]  # the server has seen the close
    assert json.loads(left)["type"] == "leave"
    assert value(service, "wschat_connections_open") == 1
    assert value(service, "wschat_connections_closed_total", code="1000") == 1
    assert value(service, "wschat_frames_delivered_total") == 6
    assert value(service, "wschat_sent_bytes_total") == sent + len(left)


@pytest_twisted.ensureDeferred
async def test_closed_connections_by_code(daemon):
    """A dropped TCP connection counts as 1006; a close with code 4000 as 'other'."""
    service, url = daemon()
    watcher = await connect(url, protocols=[JSON_SUBPROTOCOL])
    await watcher.messages.get()  # welcome
    closing = await connect(url)
    await closing.nextText()
    await watcher.messages.get()  # join
    closing.sendClose(4000, "bye")
    await closing.closed
    await watcher.messages.get()  # leave: the server has seen the close
    abrupt = await connect(url)
    await abrupt.nextText()
    await watcher.messages.get()
    abrupt.transport.abortConnection()
    await watcher.messages.get()  # leave
    assert value(service, "wschat_connections_closed_total", code="other") == 1
    assert value(service, "wschat_connections_closed_total", code="1006") == 1
    assert value(service, "wschat_connections_open") == 1


@pytest_twisted.ensureDeferred
async def test_client_close_codes_make_bounded_series(daemon):
    """
    However many distinct close codes clients send, /metrics has one series per registered
    code (1000-1015) and one 'other' for all the rest.
    """
    service, url = daemon("--welcome", "")
    http = url.replace("ws://", "http://")
    watcher = await connect(url, protocols=[JSON_SUBPROTOCOL])
    await watcher.messages.get()  # welcome
    codes = [1000, *range(3000, 3040), *range(4000, 4040)]
    for code in codes:
        client = await connect(url)
        await watcher.messages.get()  # join
        client.sendClose(code)
        await client.closed
        await watcher.messages.get()  # leave: the server has counted the close
    status, body = await get(http + "/metrics")
    closed = {
        labels: count
        for (name, labels), count in samples(body).items()
        if name == "wschat_connections_closed_total"
    }
    assert closed == {
        (("code", "1000"),): 1,
        (("code", "other"),): 80,
    }
    watcher.sendClose(1000)
    await watcher.closed


@pytest_twisted.ensureDeferred
async def test_metrics_served_on_chat_port(daemon):
    """GET /metrics on the chat port is the Prometheus exposition of this daemon's registry."""
    service, url = daemon()
    other, otherURL = daemon()
    client = await connect(url)
    await client.nextText()
    client.sendText("x")
    await client.nextText()
    code, body = await get(url.replace("ws://", "http://") + "/metrics")
    assert code == 200
    found = samples(body)
    assert found[("wschat_connections_open", ())] == 1
    assert found[("wschat_messages_broadcast_total", ())] == 1
    assert ("process_open_fds", ()) in found
    # The other daemon in this process counted nothing.
    code, body = await get(otherURL.replace("ws://", "http://") + "/metrics")
    assert samples(body)[("wschat_messages_broadcast_total", ())] == 0


@pytest_twisted.ensureDeferred
async def test_metrics_listen_moves_metrics(daemon):
    """--metrics-listen serves /metrics and /healthz there, and no longer on the chat port."""
    service, url = daemon("--metrics-listen", "tcp:0:interface=127.0.0.1")
    assert service.metricsEndpoint is not None
    metricsPort = service.metricsEndpoint.port.getHost().port
    assert (await get(url.replace("ws://", "http://") + "/metrics"))[0] == 404
    code, body = await get(f"http://127.0.0.1:{metricsPort}/metrics")
    assert (code, samples(body)[("wschat_connections_open", ())]) == (200, 0)
    code, body = await get(f"http://127.0.0.1:{metricsPort}/healthz")
    assert (code, json.loads(body)["status"]) == (200, "ok")
    assert (await get(f"http://127.0.0.1:{metricsPort}/"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_no_metrics(daemon):
    """--no-metrics: /metrics is 404, /healthz still answers."""
    service, url = daemon("--no-metrics")
    http = url.replace("ws://", "http://")
    assert (await get(http + "/metrics"))[0] == 404
    assert (await get(http + "/healthz"))[0] == 200
    assert service.metricsEndpoint is None
