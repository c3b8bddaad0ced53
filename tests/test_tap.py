"""Command-line options, the service tree, and the twistd plugin."""

from __future__ import annotations

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from wschat.handshake import Origin, OriginPolicy
from wschat.server import ChatServer
from wschat.tap import Options, buildServer, portDescription
from wschat.wire import Format


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """With no options the daemon listens on 127.0.0.1:2000 in prefixed format."""
        options = parse()
        self.assertEqual(
            {k: options[k] for k in ("port", "interface", "listen", "format", "welcome")},
            {
                "port": 2000,
                "interface": "127.0.0.1",
                "listen": ["tcp:2000:interface=127.0.0.1"],
                "format": Format.PREFIXED,
                "welcome": "Welcome to chat! Type a message",
            },
        )
        self.assertFalse(options["no-message-log"])

    def test_port_and_interface(self) -> None:
        """--port and --interface become one TCP endpoint description."""
        self.assertEqual(
            parse("--port", "2001", "--interface", "0.0.0.0")["listen"],
            ["tcp:2001:interface=0.0.0.0"],
        )

    def test_ipv6_interface_is_quoted(self) -> None:
        """An IPv6 interface's colons are escaped in the endpoint description."""
        self.assertEqual(portDescription(2000, "::1"), r"tcp:2000:interface=\:\:1")

    def test_listen_replaces_port(self) -> None:
        """--listen repeats and replaces --port/--interface."""
        options = parse("--port", "9", "--listen", "tcp:2001", "--listen", "unix:/tmp/wschat.sock")
        self.assertEqual(options["listen"], ["tcp:2001", "unix:/tmp/wschat.sock"])

    def test_bad_listen(self) -> None:
        """A --listen that is no endpoint description is a usage error naming it."""
        e = self.assertRaises(usage.UsageError, parse, "--listen", "bogus:2000")
        self.assertIn("bogus:2000", str(e))

    def test_bad_port(self) -> None:
        """A port that is not a number in 0-65535 is a usage error."""
        self.assertRaises(usage.UsageError, parse, "--port", "70000")
        self.assertRaises(usage.UsageError, parse, "--port", "two")

    def test_format(self) -> None:
        """--format takes prefixed or raw, nothing else."""
        self.assertEqual(parse("--format", "raw")["format"], Format.RAW)
        e = self.assertRaises(usage.UsageError, parse, "--format", "json")
        self.assertIn("prefixed, raw", str(e))

    def test_flags_reach_the_server(self) -> None:
        """--welcome, --format, --no-message-log, --no-connection-log configure the server."""
        service = buildServer(parse("--welcome", "", "--format", "raw", "--no-message-log"))
        self.assertIsInstance(service, ChatServer)
        self.assertEqual(service.welcome, b"")
        self.assertEqual(service.room.format, Format.RAW)
        self.assertFalse(service.logMessages)
        self.assertTrue(service.logConnections)
        quiet = buildServer(parse("--no-connection-log"))
        self.assertFalse(quiet.logConnections)
        self.assertTrue(quiet.logMessages)

    def test_server_runs_on_the_reactor_given(self) -> None:
        """buildServer's reactor runs the connections and the shutdown bound, not the global one."""
        clock = MemoryReactorClock()
        service = buildServer(parse("--listen", "tcp:0"), reactor=clock)
        self.assertIs(service.reactor, clock)
        self.assertIs(service.clock, clock)
        self.assertIs(service.factory.reactor, clock)
        service.startService()
        self.assertEqual([port for port, *_ in clock.tcpServers], [0])
        service.stopService()

    def test_one_listener_per_endpoint(self) -> None:
        """buildServer builds a listening service per --listen, and listens on none yet."""
        service = buildServer(parse("--listen", "tcp:0", "--listen", "tcp6:0"))
        self.assertEqual([e.description for e in service.endpoints], ["tcp:0", "tcp6:0"])
        self.assertEqual(service.ports, [])


class OriginProxyShutdownOptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """By default: own origin only, X-Forwarded-For ignored, 5 s to close on stop."""
        options = parse()
        self.assertEqual(
            {k: options[k] for k in ["allowed-origin", "trust-forwarded-for", "shutdown-timeout"]},
            {"allowed-origin": [], "trust-forwarded-for": 0, "shutdown-timeout": 5.0},
        )
        self.assertEqual(options["origins"], OriginPolicy())

    def test_allowedOriginRepeats(self) -> None:
        """--allowed-origin repeats, and builds the server's origin policy."""
        options = parse("--allowed-origin", "https://a.example", "--allowed-origin", "null")
        service = buildServer(options)
        self.assertEqual(
            service.origins.allowed,
            frozenset({Origin("https", "a.example", 443), Origin("null", "", None)}),
        )
        self.assertFalse(service.origins.allowAll)
        self.assertTrue(buildServer(parse("--allowed-origin", "*")).origins.allowAll)

    def test_allowedOriginRefused(self) -> None:
        """Something that is not an origin is a usage error naming the option."""
        with self.assertRaises(usage.UsageError) as caught:
            parse("--allowed-origin", "chat.example.com")
        self.assertIn("--allowed-origin", str(caught.exception))
        self.assertIn("scheme://host[:port]", str(caught.exception))

    def test_allowedHost(self) -> None:
        """--allowed-host repeats, and builds the policy the port applies to Host."""
        server = buildServer(parse("--allowed-host", "Chat.Example", "--allowed-host", ".corp.x"))
        hosts = server.hosts
        self.assertEqual(
            (hosts.allowed, hosts.domains), (frozenset({"chat.example"}), (".corp.x",))
        )
        self.assertTrue(buildServer(parse("--allowed-host", "*")).hosts.allowAll)
        self.assertFalse(buildServer(parse()).hosts.allows("evil.example"))
        with self.assertRaises(usage.UsageError) as caught:
            parse("--allowed-host", "https://chat.example")
        self.assertIn("--allowed-host", str(caught.exception))

    def test_trustForwardedFor(self) -> None:
        """--trust-forwarded-for takes a hop count to the server; a negative one is refused."""
        self.assertEqual(buildServer(parse("--trust-forwarded-for", "2")).trustedHops, 2)
        self.assertRaises(usage.UsageError, parse, "--trust-forwarded-for", "-1")
        self.assertRaises(usage.UsageError, parse, "--trust-forwarded-for", "x")

    def test_shutdownTimeout(self) -> None:
        """--shutdown-timeout reaches the service; negative or not a number is refused."""
        self.assertEqual(buildServer(parse("--shutdown-timeout", "2.5")).shutdownTimeout, 2.5)
        for bad in ["-1", "nan", "soon"]:
            with self.subTest(value=bad):
                self.assertRaises(usage.UsageError, parse, "--shutdown-timeout", bad)


class PluginTests(SynchronousTestCase):
    def test_plugin_is_installed(self) -> None:
        """The installed package exposes the 'wschat' twistd plugin."""
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("wschat", makers)
        self.assertEqual(makers["wschat"].module, "wschat.tap")
        self.assertIs(makers["wschat"].options, Options)
