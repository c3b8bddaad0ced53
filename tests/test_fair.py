"""
Each connection's share of the room's inbound work, in memory on a clock: the budget's
arithmetic, and a connection over it read more slowly (its transport paused), apart from the
write side's flow control.
"""

from __future__ import annotations

from rawws import RawPeer, frame
from test_hostile import ClockedTestCase
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wschat.bench.frames import OP_CONTINUATION as OP_CONT
from wschat.bench.frames import OP_PING, OP_PONG, OP_TEXT
from wschat.limits import InboundBudget, Limits


class InboundBudgetTests(SynchronousTestCase):
    def budget(self, frames: float = 10, size: float = 1000, burst: float = 2) -> InboundBudget:
        self.clock = Clock()
        return InboundBudget(frames, size, burst, self.clock.seconds)

    def test_burst_then_wait(self) -> None:
        """A burst's worth is free; past it, the wait pays the debt back at the rate."""
        b = self.budget()
        self.assertEqual([b.spend(1, 0) for _ in range(20)], [0.0] * 20)
        self.assertAlmostEqual(b.spend(5, 0), 0.5)

    def test_bytes_counted_too(self) -> None:
        """Payload bytes have their own rate; the longer wait of the two applies."""
        b = self.budget()
        self.assertEqual(b.spend(1, 2000), 0.0)
        self.assertAlmostEqual(b.spend(1, 3000), 3.0)

    def test_refills_at_rate_up_to_burst(self) -> None:
        """Time pays back at the rate, and the budget never holds more than the burst."""
        b = self.budget()
        b.spend(20, 0)
        self.clock.advance(1)
        self.assertEqual(b.spend(10, 0), 0.0)
        self.clock.advance(100)
        self.assertEqual(b.spend(20, 0), 0.0)
        self.assertGreater(b.spend(1, 0), 0.0)

    def test_over_since(self) -> None:
        """overSince is when the sender went over, until its budget is full again."""
        b = self.budget()
        self.assertIsNone(b.overSince)
        self.clock.advance(5)
        b.spend(25, 0)
        self.assertEqual(b.overSince, 5)
        self.clock.advance(1)
        b.spend(10, 0)  # paid back, spent again at once: still over since 5
        self.assertEqual(b.overSince, 5)
        self.clock.advance(3)  # full again
        b.spend(1, 0)
        self.assertIsNone(b.overSince)

    def test_zero_rate_not_counted(self) -> None:
        """A rate of 0 counts nothing of its kind."""
        b = self.budget(frames=0)
        self.assertEqual(b.spend(10_000, 0), 0.0)
        self.assertGreater(b.spend(0, 5000), 0.0)

    def test_invalid(self) -> None:
        """Negative rates, both rates 0, or a burst of 0 are refused."""
        for args in [(-1, 1, 1), (1, -1, 1), (0, 0, 1), (1, 1, 0)]:
            self.assertRaises(ValueError, InboundBudget, *args, Clock().seconds)

    def test_defaults(self) -> None:
        """The documented defaults."""
        limits = Limits()
        self.assertEqual(
            (
                limits.inboundRate,
                limits.inboundBytes,
                limits.inboundBurst,
                limits.inboundHold,
                limits.maxMessageFrames,
            ),
            (250.0, 256 << 10, 2.0, 60.0, 1024),
        )


class FairReadingTests(ClockedTestCase):
    def test_over_share_reading_paused_then_resumed(self) -> None:
        """Past its burst a connection's transport stops reading; it reads again once paid."""
        factory = self.factory(inboundRate=10, inboundBurst=1)
        a, b = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        a.send(b"".join(frame(OP_TEXT, b"m%d" % i) for i in range(200)))
        self.assertEqual(a.transport.producerState, "paused")
        self.assertLess(len(b.texts()), 100)
        self.clock.advance(0.5)
        self.assertEqual(a.transport.producerState, "paused")
        for _ in range(50):
            self.clock.advance(0.5)
        self.assertEqual(a.transport.producerState, "producing")
        self.assertEqual(b.texts(), [b"m%d" % i for i in range(200)])
        self.assertIsNone(a.closeFrame())

    def test_write_side_resume_does_not_resume_reading(self) -> None:
        """The write buffer draining (our resumeProducing) leaves a held-back reader held."""
        factory = self.factory(inboundRate=10, inboundBurst=1)
        a = RawPeer(factory).open()
        a.send(frame(OP_PING) * 30)
        self.assertEqual(a.transport.producerState, "paused")
        a.protocol.pauseProducing()
        a.protocol.resumeProducing()
        self.assertEqual(a.transport.producerState, "paused")

    def test_pings_counted(self) -> None:
        """Pings are frames of the share: a ping flood is answered at the share's pace."""
        factory = self.factory(inboundRate=10, inboundBurst=1)
        a = RawPeer(factory).open()
        a.send(frame(OP_PING) * 1000)
        pongs = sum(op == OP_PONG for op, _ in a.frames())
        # The burst, and what was left of the slice being parsed when it ran out.
        self.assertLess(pongs, 100)
        self.assertEqual(a.transport.producerState, "paused")

    def test_hold_bound_closes_1008(self) -> None:
        """Over its share longer than --inbound-hold, a connection is closed with 1008."""
        factory = self.factory(inboundRate=10, inboundBurst=1, inboundHold=5)
        a = RawPeer(factory).open()
        for _ in range(100):
            a.send(frame(OP_TEXT, b"x") * 10)
            self.clock.advance(0.5)
        self.assertEqual(a.closeFrame(), (1008, "sending too fast: over its inbound share for 5 s"))

    def test_pings_after_close_ignored(self) -> None:
        """A never-reader's pings after it was closed are neither answered nor counted again."""
        factory = self.factory(maxQueue=1000, inboundRate=0, inboundBytes=0)
        peer = RawPeer(factory).open()
        peer.protocol.pauseProducing()
        for _ in range(20):
            peer.send(frame(OP_PING, b"p" * 125))
        self.assertEqual(peer.closeFrame()[0], 1008)  # type: ignore[index]
        registry = factory.chatServer.metrics.registry
        self.assertEqual(registry.get_sample_value("wschat_clients_dropped_total"), 1)
        self.assertEqual(sum(op == OP_PONG for op, _ in peer.frames()), 7)

    def test_empty_fragments_refused(self) -> None:
        """Past 8 empty frames in one message: 1008, and nothing more is read."""
        factory = self.factory()
        a = RawPeer(factory).open()
        a.send(frame(OP_TEXT, b"x", fin=False) + frame(OP_CONT, fin=False) * 8)
        self.assertIsNone(a.closeFrame())
        a.send(frame(OP_CONT, fin=False) + frame(OP_PING))
        self.assertEqual(a.closeFrame(), (1008, "more than 8 empty frames in a message"))
        self.assertNotIn(OP_PONG, [op for op, _ in a.frames()])

    def test_frames_per_message_capped(self) -> None:
        """A message in more frames than --max-message-frames: 1009; its fragments let go."""
        factory = self.factory(maxMessageFrames=10)
        a = RawPeer(factory).open()
        a.send(frame(OP_TEXT, b"x", fin=False) + frame(OP_CONT, b"y", fin=False) * 9)
        self.assertIsNone(a.closeFrame())
        a.send(frame(OP_CONT, b"y", fin=False))
        self.assertEqual(a.closeFrame(), (1009, "message too big: more than 10 frames"))
        self.assertEqual(a.protocol.message_data, [])

    def test_one_empty_frame_is_fine(self) -> None:
        """An empty message, and an empty last fragment, are relayed as usual."""
        factory = self.factory()
        a, b = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        a.send(frame(OP_TEXT))
        a.send(frame(OP_TEXT, b"ab", fin=False) + frame(OP_CONT))
        self.assertEqual(b.texts(), [b"", b"ab"])


class InboundOptionsTests(SynchronousTestCase):
    def test_options(self) -> None:
        """Each inbound option sets its limit; bytes take K/M units."""
        from wschat.tap import Options, limitsFromOptions

        options = Options()
        options.parseOptions(
            [
                "--inbound-rate=50",
                "--inbound-bytes=64K",
                "--inbound-burst=1",
                "--inbound-hold=30",
                "--max-message-frames=64",
            ]
        )
        limits = limitsFromOptions(options)
        self.assertEqual(
            (
                limits.inboundRate,
                limits.inboundBytes,
                limits.inboundBurst,
                limits.inboundHold,
                limits.maxMessageFrames,
            ),
            (50.0, 64 << 10, 1.0, 30.0, 64),
        )

    def test_invalid_options(self) -> None:
        """Values that make no sense are usage errors."""
        from twisted.python import usage

        from wschat.tap import Options

        for arg in [
            "--inbound-rate=-1",
            "--inbound-bytes=-1",
            "--inbound-burst=0",
            "--inbound-hold=0",
            "--max-message-frames=0",
        ]:
            self.assertRaises(usage.UsageError, Options().parseOptions, [arg])
