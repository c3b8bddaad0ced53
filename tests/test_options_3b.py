"""Command-line options for origins, proxies and shutdown."""

from __future__ import annotations

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from wschat.handshake import Origin, OriginPolicy
from wschat.tap import Options, makeService


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """By default: own origin only, X-Forwarded-For ignored, 5 s to close on stop."""
        options = parse()
        self.assertEqual(
            {k: options[k] for k in ["allowed-origin", "trust-forwarded-for", "shutdown-timeout"]},
            {"allowed-origin": [], "trust-forwarded-for": 0, "shutdown-timeout": 5.0},
        )
        self.assertEqual(options["origins"], OriginPolicy())

    def test_allowedOriginRepeats(self) -> None:
        """--allowed-origin repeats, and builds the factory's origin policy."""
        options = parse("--allowed-origin", "https://a.example", "--allowed-origin", "null")
        service = makeService(options)
        self.assertEqual(
            service.factory.origins.allowed,
            frozenset({Origin("https", "a.example", 443), Origin("null", "", None)}),
        )
        self.assertFalse(service.factory.origins.allowAll)
        self.assertTrue(makeService(parse("--allowed-origin", "*")).factory.origins.allowAll)

    def test_allowedOriginRefused(self) -> None:
        """Something that is not an origin is a usage error naming the option."""
        with self.assertRaises(usage.UsageError) as caught:
            parse("--allowed-origin", "chat.example.com")
        self.assertIn("--allowed-origin", str(caught.exception))
        self.assertIn("scheme://host[:port]", str(caught.exception))

    def test_trustForwardedFor(self) -> None:
        """--trust-forwarded-for takes a hop count to the factory; a negative one is refused."""
        self.assertEqual(makeService(parse("--trust-forwarded-for", "2")).factory.trustedHops, 2)
        self.assertRaises(usage.UsageError, parse, "--trust-forwarded-for", "-1")
        self.assertRaises(usage.UsageError, parse, "--trust-forwarded-for", "x")

    def test_shutdownTimeout(self) -> None:
        """--shutdown-timeout reaches the service; negative or not a number is refused."""
        self.assertEqual(makeService(parse("--shutdown-timeout", "2.5")).shutdownTimeout, 2.5)
        for bad in ["-1", "nan", "soon"]:
            with self.subTest(value=bad):
                self.assertRaises(usage.UsageError, parse, "--shutdown-timeout", bad)
