"""The pure limit logic: token bucket, per-address counting, sizes, defaults."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wschat.limits import ConnectionCounter, Limits, TokenBucket, hostKey, parseSize


class TokenBucketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_burst_then_refused(self) -> None:
        """A full bucket allows exactly ``burst`` events at once, then refuses."""
        bucket = TokenBucket(2.0, 3, self.clock.seconds)
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])

    def test_refills_at_rate(self) -> None:
        """Tokens come back at ``rate`` per second: one every half second at rate 2."""
        bucket = TokenBucket(2.0, 1, self.clock.seconds)
        self.assertTrue(bucket.take())
        self.clock.advance(0.49)
        self.assertFalse(bucket.take())
        self.clock.advance(0.02)
        self.assertTrue(bucket.take())
        self.assertFalse(bucket.take())

    def test_refill_capped_at_burst(self) -> None:
        """A long quiet spell refills the bucket to ``burst``, not beyond."""
        bucket = TokenBucket(10.0, 2, self.clock.seconds)
        self.clock.advance(3600)
        self.assertEqual([bucket.take() for _ in range(3)], [True, True, False])

    def test_steady_rate_allowed(self) -> None:
        """A sender keeping exactly to the rate is never refused."""
        bucket = TokenBucket(5.0, 1, self.clock.seconds)
        for _ in range(100):
            self.assertTrue(bucket.take())
            self.clock.advance(0.2)

    def test_refused_events_cost_nothing(self) -> None:
        """Refused attempts do not push the next allowed one further away."""
        bucket = TokenBucket(1.0, 1, self.clock.seconds)
        self.assertTrue(bucket.take())
        for _ in range(10):
            self.clock.advance(0.05)
            self.assertFalse(bucket.take())
        self.clock.advance(0.5)
        self.assertTrue(bucket.take())

    def test_clock_stepping_back(self) -> None:
        """A clock that steps backwards neither adds nor drains tokens."""
        bucket = TokenBucket(1.0, 2, self.clock.seconds)
        self.clock.advance(100)
        bucket.take()
        self.clock.rightNow -= 50
        self.assertTrue(bucket.take())
        self.assertFalse(bucket.take())

    def test_invalid(self) -> None:
        """A bucket needs a positive rate and a burst of at least one."""
        self.assertRaises(ValueError, TokenBucket, 0, 1, self.clock.seconds)
        self.assertRaises(ValueError, TokenBucket, 1, 0, self.clock.seconds)


class ConnectionCounterTests(SynchronousTestCase):
    def test_limit_per_key(self) -> None:
        """Each key may hold ``limit`` connections; other keys are counted apart."""
        counter = ConnectionCounter(2)
        self.assertTrue(counter.acquire("a"))
        self.assertTrue(counter.acquire("a"))
        self.assertFalse(counter.acquire("a"))
        self.assertTrue(counter.acquire("b"))
        self.assertEqual((counter["a"], counter["b"]), (2, 1))

    def test_release_frees_a_slot_and_forgets_idle_keys(self) -> None:
        """Releasing makes room again, and a key at zero is forgotten (no slow leak)."""
        counter = ConnectionCounter(1)
        self.assertTrue(counter.acquire("a"))
        counter.release("a")
        self.assertEqual(len(counter), 0)
        self.assertTrue(counter.acquire("a"))
        counter.release("a")
        counter.release("a")
        self.assertEqual(counter["a"], 0)

    def test_zero_is_unlimited(self) -> None:
        """A limit of 0 admits everyone and keeps no state."""
        counter = ConnectionCounter(0)
        self.assertTrue(all(counter.acquire("a") for _ in range(1000)))
        self.assertEqual(len(counter), 0)


class HostKeyTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        """An IPv4 peer counts as its address, whatever its port."""
        self.assertEqual(hostKey(IPv4Address("TCP", "10.1.2.3", 5)), "10.1.2.3")

    def test_ipv6_slash_64(self) -> None:
        """IPv6 peers in one /64 count as one, since one user usually holds a whole /64."""
        a = hostKey(IPv6Address("TCP", "2001:db8:1:2::1", 5))
        b = hostKey(IPv6Address("TCP", "2001:db8:1:2:ffff::9", 6))
        c = hostKey(IPv6Address("TCP", "2001:db8:1:3::1", 6))
        self.assertEqual(a, "2001:db8:1:2::/64")
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)

    def test_ipv4_mapped(self) -> None:
        """An IPv4-mapped IPv6 peer counts as its IPv4 address."""
        self.assertEqual(hostKey(IPv6Address("TCP", "::ffff:10.1.2.3", 5)), "10.1.2.3")

    def test_unix_not_counted(self) -> None:
        """A UNIX-socket peer is local and not counted."""
        self.assertIsNone(hostKey(UNIXAddress(b"/tmp/s")))


class ParseSizeTests(SynchronousTestCase):
    def test_units(self) -> None:
        """Plain bytes and binary K/M/G units, with or without 'iB'/'B', any case."""
        cases = {
            "65536": 65536,
            "64K": 65536,
            "64k": 65536,
            "64KiB": 65536,
            "64KB": 65536,
            "1M": 1 << 20,
            "1MiB": 1 << 20,
            "2g": 2 << 30,
        }
        self.assertEqual({text: parseSize(text) for text in cases}, cases)

    def test_invalid(self) -> None:
        """Anything else is refused with ValueError."""
        for text in ["", "-1", "1.5M", "1T", "lots", "1 M B"]:
            self.assertRaises(ValueError, parseSize, text)


class LimitsDefaultsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """The defaults the README documents."""
        self.assertEqual(
            Limits(),
            Limits(
                maxQueue=1 << 20,
                maxMessageSize=64 << 10,
                pingInterval=20.0,
                pingTimeout=20.0,
                handshakeTimeout=10.0,
                rateLimit=0.0,
                rateBurst=20,
                maxConnections=0,
                maxConnectionsPerIp=0,
            ),
        )
