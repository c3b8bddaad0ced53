"""The limit options: parsing, validation, and what reaches the factory."""

from __future__ import annotations

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from wschat.limits import Limits
from wschat.protocol import acceptDeflate
from wschat.server import ChatServer
from wschat.tap import Options, buildServer, limitsFromOptions


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


class LimitOptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """With no options the daemon runs with the documented default limits."""
        options = parse()
        self.assertEqual(limitsFromOptions(options), Limits())
        self.assertFalse(options["compression"])

    def test_every_option(self) -> None:
        """Each option sets its limit; sizes take K/M units."""
        options = parse(
            "--max-queue=256K",
            "--max-message-size=1MiB",
            "--ping-interval=5",
            "--ping-timeout=2.5",
            "--handshake-timeout=3",
            "--rate-limit=0.5",
            "--rate-burst=4",
            "--max-connections=100",
            "--max-connections-per-ip=10",
            "--compression",
        )
        self.assertEqual(
            limitsFromOptions(options),
            Limits(
                maxQueue=256 << 10,
                maxMessageSize=1 << 20,
                pingInterval=5.0,
                pingTimeout=2.5,
                handshakeTimeout=3.0,
                rateLimit=0.5,
                rateBurst=4,
                maxConnections=100,
                maxConnectionsPerIp=10,
            ),
        )
        self.assertTrue(options["compression"])

    def test_invalid_values_are_usage_errors(self) -> None:
        """Values that make no sense are refused with a usage error, not a traceback."""
        for args in [
            ["--max-queue=0"],
            ["--max-queue=lots"],
            ["--max-message-size=-1"],
            ["--ping-interval=-1"],
            ["--ping-timeout=0"],
            ["--handshake-timeout=0"],
            ["--handshake-timeout=nan"],
            ["--rate-limit=-1"],
            ["--rate-limit=inf"],
            ["--rate-burst=0"],
            ["--max-connections=-1"],
            ["--max-connections-per-ip=1.5"],
        ]:
            self.assertRaises(usage.UsageError, parse, *args)


class FactoryOptionsTests(SynchronousTestCase):
    def test_limits_reach_autobahn(self) -> None:
        """buildServer hands each limit to the Autobahn option that enforces it."""
        server = buildServer(
            parse(
                "--max-message-size=2K",
                "--ping-interval=7",
                "--ping-timeout=3",
                "--handshake-timeout=4",
                "--max-connections=9",
                "--max-connections-per-ip=2",
                "--max-queue=10K",
            )
        )
        factory = server.factory
        self.assertEqual(
            (
                factory.maxFramePayloadSize,
                factory.maxMessagePayloadSize,
                factory.autoPingInterval,
                factory.autoPingTimeout,
                factory.openHandshakeTimeout,
                factory.maxConnections,
                server.connectionsPerHost.limit,
                server.limits.maxQueue,
            ),
            (2048, 2048, 7.0, 3.0, 4.0, 9, 2, 10240),
        )

    def test_failures_send_close_codes_and_no_status_page(self) -> None:
        """Protocol failures close with a code (not a bare drop); no HTML status page."""
        factory = buildServer(parse()).factory
        self.assertFalse(factory.failByDrop)
        self.assertFalse(factory.webStatus)

    def test_null_origin_setting_kept(self) -> None:
        """Applying the limits keeps Autobahn's allowNullOrigin (setProtocolOptions resets it)."""
        factory = ChatServer().factory
        self.assertTrue(factory.allowNullOrigin)
        factory.setProtocolOptions(allowNullOrigin=False)
        factory.setProtocolOptions(allowNullOrigin=factory.allowNullOrigin)
        self.assertFalse(factory.allowNullOrigin)

    def test_compression_flag(self) -> None:
        """--compression accepts permessage-deflate offers; without it none is accepted."""
        self.assertIs(
            buildServer(parse("--compression")).factory.perMessageCompressionAccept, acceptDeflate
        )
        self.assertIsNone(buildServer(parse()).factory.perMessageCompressionAccept(["offer"]))
