"""Presence under churn: join and leave one by one, summed up when they come fast."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.trial.unittest import SynchronousTestCase

from wschat.room import PRESENCE_EVENTS, PRESENCE_WINDOW
from wschat.testing import MemoryRoom, closeAll, connect, received
from wschat.wire import JSON_SUBPROTOCOL


def presence(client) -> list[dict]:
    """The presence objects (join, leave, presence) a JSON client has received so far."""
    objects = [json.loads(payload) for payload, _ in received(client)]
    return [o for o in objects if o["type"] in ("join", "leave", "presence")]


class CoalescingTests(SynchronousTestCase):
    def test_few_events_one_by_one(self) -> None:
        """Within the window's allowance every join and leave is its own object."""
        room = MemoryRoom(welcome="")
        server, observer = self.jsonClient(room, 1)
        received(observer)
        room.clock.advance(PRESENCE_WINDOW)  # its own join is in a window of its own
        for port in range(2, 2 + PRESENCE_EVENTS // 2):
            s, c = room.connect(port=port)
            c.sendClose(1000)
            room.flush()
        kinds = [o["type"] for o in presence(observer)]
        self.assertEqual(kinds, ["join", "leave"] * (PRESENCE_EVENTS // 2))

    def test_storm_summed_up(self) -> None:
        """Past the allowance, the rest of the window comes as one presence object."""
        room = MemoryRoom(welcome="")
        server, observer = self.jsonClient(room, 1)
        received(observer)
        room.clock.advance(PRESENCE_WINDOW)  # its own join is in a window of its own
        for port in range(2, 52):
            s, c = room.connect(port=port)
            c.sendClose(1000)
            room.flush()
        objects = presence(observer)
        self.assertEqual(len(objects), PRESENCE_EVENTS)
        room.clock.advance(PRESENCE_WINDOW)
        room.flush()
        (summary,) = presence(observer)
        joins = sum(o["type"] == "join" for o in objects)
        leaves = sum(o["type"] == "leave" for o in objects)
        self.assertEqual(summary["type"], "presence")
        self.assertEqual((summary["joined"] + joins, summary["left"] + leaves), (50, 50))
        self.assertEqual(summary["online"], 1)
        # The next window starts afresh: the next event is sent on its own.
        room.clock.advance(PRESENCE_WINDOW)
        s, c = room.connect(port=99)
        self.assertEqual([o["type"] for o in presence(observer)], ["join"])

    def jsonClient(self, room: MemoryRoom, port: int):
        from twisted.internet.address import IPv4Address

        from wschat.testing import QueueClientFactory, memoryConnection

        factory = QueueClientFactory(
            "ws://127.0.0.1:2000", reactor=room.clock, protocols=[JSON_SUBPROTOCOL]
        )
        server, client, pump = memoryConnection(
            room.factory, factory, peer=IPv4Address("TCP", "127.0.0.1", port), clock=room.clock
        )
        room.pumps.append(pump)
        room.flush()
        return server, client


@pytest_twisted.ensureDeferred
async def test_churn_coalesced_for_json_clients(daemon):
    """
    50 clients joining and leaving at once reach a JSON client as a few joins and leaves and
    presence summaries, which together count all 100 events.
    """
    service, url = daemon("--welcome", "")
    observer = await connect(url, protocols=[JSON_SUBPROTOCOL])
    await observer.nextText()  # welcome
    for _ in range(50):
        churn = await connect(url)
        await closeAll([churn])
    frames = joined = left = 0
    online = None
    while joined + left < 100:
        obj = json.loads(await observer.nextText())
        frames += 1
        online = obj["online"]
        if obj["type"] == "join":
            joined += 1
        elif obj["type"] == "leave":
            left += 1
        else:
            assert obj["type"] == "presence", obj
            joined += obj["joined"]
            left += obj["left"]
    assert (joined, left, online) == (50, 50, 1)
    assert frames < 50, frames
    await closeAll([observer])
