"""Origin policy and X-Forwarded-For, as plain functions: no sockets, no reactor."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from wschat.handshake import (
    NULL_ORIGIN,
    HostPolicy,
    Origin,
    OriginPolicy,
    forwardedClient,
    listensOnLoopbackOnly,
    parseHost,
    parseOrigin,
    sameOrigin,
    senderAddress,
)


class ParseOriginTests(SynchronousTestCase):
    def test_defaultPorts(self) -> None:
        """http and https origins without a port get 80 and 443."""
        self.assertEqual(parseOrigin("http://example.com"), Origin("http", "example.com", 80))
        self.assertEqual(parseOrigin("https://example.com"), Origin("https", "example.com", 443))

    def test_normalised(self) -> None:
        """Scheme and host compare case-insensitively; a trailing slash is tolerated."""
        self.assertEqual(
            parseOrigin("HTTPS://Chat.Example.COM:8443/"), Origin("https", "chat.example.com", 8443)
        )

    def test_ipv6(self) -> None:
        """A bracketed IPv6 origin parses to the bare address."""
        self.assertEqual(parseOrigin("http://[::1]:2000"), Origin("http", "::1", 2000))

    def test_null(self) -> None:
        """'null' is the opaque origin."""
        self.assertEqual(parseOrigin("null"), NULL_ORIGIN)
        self.assertEqual(parseOrigin("NULL"), NULL_ORIGIN)

    def test_notOrigins(self) -> None:
        """Things that are not scheme://host[:port] are refused."""
        for text in [
            "example.com",
            "https://",
            "https://example.com/chat",
            "https://example.com?x=1",
            "https://user@example.com",
            "https://:secret@example.com",
            "https://@example.com",
            "https://example.com:99999",
            "https://example.com:http",
            "",
        ]:
            with self.subTest(text=text):
                self.assertRaises(ValueError, parseOrigin, text)


class SameOriginTests(SynchronousTestCase):
    def test_sameHostAndPort(self) -> None:
        """An http page from the Host the request names, same port, is same-origin."""
        self.assertTrue(sameOrigin(parseOrigin("http://localhost:2000"), "localhost:2000", False))
        self.assertTrue(sameOrigin(parseOrigin("http://LocalHost:2000"), "localhost:2000", False))
        self.assertTrue(sameOrigin(parseOrigin("http://[::1]:2000"), "[::1]:2000", False))

    def test_defaultPorts(self) -> None:
        """A Host without a port means 80 for a plain connection, 443 for TLS."""
        self.assertTrue(sameOrigin(parseOrigin("http://example.com"), "example.com", False))
        self.assertTrue(sameOrigin(parseOrigin("https://example.com"), "example.com", True))
        self.assertTrue(sameOrigin(parseOrigin("https://example.com"), "example.com:443", True))
        self.assertFalse(sameOrigin(parseOrigin("https://example.com:8443"), "example.com", True))

    def test_schemeFollowsTLS(self) -> None:
        """An https page is not same-origin with a plain connection, nor http with TLS."""
        self.assertFalse(sameOrigin(parseOrigin("https://example.com:80"), "example.com", False))
        self.assertFalse(sameOrigin(parseOrigin("http://example.com:443"), "example.com", True))

    def test_otherHostOrPort(self) -> None:
        """Another host, or another port on the same host, is another origin."""
        self.assertFalse(sameOrigin(parseOrigin("http://evil.example"), "example.com", False))
        self.assertFalse(sameOrigin(parseOrigin("http://localhost:2001"), "localhost:2000", False))
        self.assertFalse(sameOrigin(parseOrigin("http://127.0.0.1:2000"), "localhost:2000", False))

    def test_nullAndMissingHost(self) -> None:
        """The null origin is never same-origin; nor is anything without a Host."""
        self.assertFalse(sameOrigin(NULL_ORIGIN, "example.com", False))
        self.assertFalse(sameOrigin(parseOrigin("http://example.com"), None, False))
        self.assertFalse(sameOrigin(parseOrigin("http://example.com"), "example.com:x", False))

    def test_parseHost(self) -> None:
        """Host headers parse to a lower-case host and a port."""
        self.assertEqual(parseHost("Example.com", False), ("example.com", 80))
        self.assertEqual(parseHost("[::1]:8080", True), ("::1", 8080))
        self.assertRaises(ValueError, parseHost, "", False)
        self.assertRaises(ValueError, parseHost, "example.com/x", False)
        self.assertRaises(ValueError, parseHost, ":x@localhost", False)


class OriginPolicyTests(SynchronousTestCase):
    def test_noOrigin(self) -> None:
        """A handshake without Origin (a program, not a page) is allowed."""
        self.assertTrue(OriginPolicy().allows(None, "example.com", False))
        self.assertTrue(OriginPolicy().allows("", "example.com", False))

    def test_defaultOwnOriginOnly(self) -> None:
        """By default, only the daemon's own origin is allowed."""
        policy = OriginPolicy()
        self.assertTrue(policy.allows("http://example.com", "example.com", False))
        self.assertFalse(policy.allows("http://evil.example", "example.com", False))
        self.assertFalse(policy.allows("null", "example.com", False))
        self.assertFalse(policy.allows("not an origin", "example.com", False))

    def test_listed(self) -> None:
        """Listed origins are allowed as well, matched on scheme, host and port."""
        policy = OriginPolicy.fromList(["https://app.example", "null"])
        self.assertTrue(policy.allows("https://app.example", "chat.example:2000", False))
        self.assertTrue(policy.allows("https://APP.example:443", "chat.example:2000", False))
        self.assertTrue(policy.allows("null", "chat.example:2000", False))
        self.assertTrue(policy.allows("http://chat.example:2000", "chat.example:2000", False))
        self.assertFalse(policy.allows("http://app.example", "chat.example:2000", False))
        self.assertFalse(policy.allows("https://app.example:8443", "chat.example:2000", False))

    def test_star(self) -> None:
        """'*' allows every origin, the null origin included."""
        policy = OriginPolicy.fromList(["*"])
        self.assertTrue(policy.allows("http://evil.example", "example.com", False))
        self.assertTrue(policy.allows("null", "example.com", False))

    def test_fromListRefuses(self) -> None:
        """A value that is neither an origin, 'null' nor '*' is refused."""
        self.assertRaises(ValueError, OriginPolicy.fromList, ["example.com"])


class ForwardedForTests(SynchronousTestCase):
    def test_offByDefault(self) -> None:
        """With no trusted hop, the header is ignored."""
        self.assertIsNone(forwardedClient("203.0.113.7", 0))

    def test_nthFromTheRight(self) -> None:
        """With N trusted hops, the client is the Nth entry from the right."""
        header = "198.51.100.1, 203.0.113.7, 10.0.0.2"
        self.assertEqual(forwardedClient(header, 1), "10.0.0.2")
        self.assertEqual(forwardedClient(header, 2), "203.0.113.7")
        self.assertEqual(forwardedClient(header, 3), "198.51.100.1")

    def test_missingOrShort(self) -> None:
        """A missing header, or one with fewer than N entries, does not say."""
        self.assertIsNone(forwardedClient(None, 1))
        self.assertIsNone(forwardedClient("", 1))
        self.assertIsNone(forwardedClient("203.0.113.7", 2))

    def test_malformed(self) -> None:
        """An entry that is not an IP address does not say (other entries do not matter)."""
        self.assertIsNone(forwardedClient("unknown", 1))
        self.assertIsNone(forwardedClient("203.0.113.7, ", 1))
        self.assertIsNone(forwardedClient("evil.example", 1))
        self.assertIsNone(forwardedClient("[::1", 1))
        self.assertIsNone(forwardedClient("203.0.113.7:x", 1))
        self.assertEqual(forwardedClient("garbage, 203.0.113.7", 1), "203.0.113.7")

    def test_forms(self) -> None:
        """IPv6, bracketed IPv6 with a port, and IPv4 with a port are read; ports dropped."""
        self.assertEqual(forwardedClient(" 2001:DB8::1 ", 1), "2001:db8::1")
        self.assertEqual(forwardedClient("[2001:db8::1]:4711", 1), "2001:db8::1")
        self.assertEqual(forwardedClient("[2001:db8::1]", 1), "2001:db8::1")
        self.assertEqual(forwardedClient("203.0.113.7:4711", 1), "203.0.113.7")


class SenderAddressTests(SynchronousTestCase):
    peer = IPv4Address("TCP", "10.0.0.2", 51234)

    def test_tcpPeer(self) -> None:
        """Untrusted or silent headers leave the TCP peer as the sender."""
        self.assertEqual(
            senderAddress(self.peer, forwardedClient("203.0.113.7", 0)), "10.0.0.2:51234"
        )
        self.assertEqual(senderAddress(self.peer, forwardedClient(None, 1)), "10.0.0.2:51234")
        self.assertEqual(senderAddress(self.peer, forwardedClient("unknown", 1)), "10.0.0.2:51234")

    def test_forwarded(self) -> None:
        """The forwarded client is shown with the TCP connection's port; IPv6 in brackets."""
        self.assertEqual(
            senderAddress(self.peer, forwardedClient("203.0.113.7", 1)), "203.0.113.7:51234"
        )
        self.assertEqual(
            senderAddress(self.peer, forwardedClient("2001:db8::1", 1)), "[2001:db8::1]:51234"
        )
        peer6 = IPv6Address("TCP", "::1", 4000)
        self.assertEqual(
            senderAddress(peer6, forwardedClient("203.0.113.7", 1)), "203.0.113.7:4000"
        )

    def test_unixPeer(self) -> None:
        """Behind a proxy on a UNIX socket the sender is the bare address (there is no port)."""
        peer = UNIXAddress(b"/run/wschat.sock")
        self.assertEqual(senderAddress(peer, forwardedClient("203.0.113.7", 1)), "203.0.113.7")
        self.assertEqual(senderAddress(peer, forwardedClient(None, 1)), "unix")


class HostPolicyTests(SynchronousTestCase):
    local = IPv4Address("TCP", "192.0.2.10", 2000)

    def test_own_names(self) -> None:
        """localhost, *.localhost, loopback addresses, the local address, the machine's name."""
        policy = HostPolicy.fromList([], own=["MyBox"])
        for host in [
            "localhost",
            "LOCALHOST:2000",
            "localhost.",
            "app.localhost",
            "127.0.0.1",
            "127.9.9.9:80",
            "[::1]:2000",
            "::1",
            "::1:2000",
            "192.0.2.10:2000",
            "mybox",
            None,
        ]:
            with self.subTest(host=host):
                self.assertTrue(policy.allows(host, self.local))

    def test_other_names(self) -> None:
        """Other names and addresses are not this daemon's, whatever the port."""
        policy = HostPolicy.fromList([], own=["mybox"])
        for host in ["evil.example", "evil.example:2000", "192.0.2.11", "localhost.evil", "mybox2"]:
            with self.subTest(host=host):
                self.assertFalse(policy.allows(host, self.local))
        # Behind a UNIX socket there is no local address to compare.
        self.assertFalse(policy.allows("192.0.2.10", UNIXAddress(b"/run/wschat.sock")))

    def test_listed(self) -> None:
        """Listed names, .domain suffixes (the domain too) and addresses; '*' is every name."""
        policy = HostPolicy.fromList(["Chat.Example.com", ".corp.example", "2001:db8::1"], own=[])
        for host in ["chat.example.com", "x.corp.example", "corp.example", "[2001:db8::1]:443"]:
            self.assertTrue(policy.allows(host, self.local), host)
        for host in ["example.com", "xcorp.example", "chat.example.com.evil"]:
            self.assertFalse(policy.allows(host, self.local), host)
        self.assertTrue(HostPolicy.fromList(["*"], own=[]).allows("anything.example"))

    def test_malformed(self) -> None:
        """A Host that is not host[:port] raises; so does a listed value that is no name."""
        policy = HostPolicy.fromList([], own=[])
        for host in ["a/b", "a b", "x:notaport", "", "::1:x", "a:b:c"]:
            with self.subTest(host=host):
                self.assertRaises(ValueError, policy.allows, host)
        for text in ["http://x", "a b", "", "x/y", "a:b:c"]:
            with self.subTest(text=text):
                self.assertRaises(ValueError, HostPolicy.fromList, [text], [])


class ListensOnLoopbackOnlyTests(SynchronousTestCase):
    def test_loopback(self) -> None:
        """TCP and TLS endpoints on a loopback interface are loopback only."""
        for description in [
            "tcp:2000:interface=127.0.0.1",
            "tcp6:2000:interface=\\:\\:1",
            "ssl:2443:privateKey=k.pem:certKey=c.pem:interface=127.0.0.1",
            "tcp:2000:interface=localhost",
        ]:
            with self.subTest(description=description):
                self.assertTrue(listensOnLoopbackOnly(description))

    def test_not_loopback(self) -> None:
        """Every interface (no interface=), another address, or a UNIX socket are not."""
        for description in [
            "tcp:2000",
            "tcp:2000:interface=0.0.0.0",
            "tcp6:2000:interface=\\:\\:",
            "ssl:2443:privateKey=k.pem",
            "unix:/run/wschat.sock",
            "tcp:2000:interface=192.0.2.1",
        ]:
            with self.subTest(description=description):
                self.assertFalse(listensOnLoopbackOnly(description))


def test_host_answers_are_kept_per_host_and_local_address():
    """A Host seen before gets the same answer, per local address; a bad one raises each time."""
    policy = HostPolicy.fromList([], own=[])
    here = IPv4Address("TCP", "192.0.2.1", 2000)
    there = IPv4Address("TCP", "192.0.2.2", 2000)
    for _ in range(2):
        assert policy.allows("192.0.2.1:2000", here) is True
        assert policy.allows("192.0.2.1:2000", there) is False
        assert policy.allows("chat.example.com", here) is False
        with pytest.raises(ValueError):
            policy.allows("bad host!", here)


def test_the_local_address_is_asked_for_only_when_the_host_is_an_address():
    """
    A Host that names the daemon (or not) by itself is answered without the connection's
    local address; an address that is not loopback asks for it, and is compared with it.
    """
    policy = HostPolicy.fromList(["chat.example.com"], own=[])
    asked: list[str] = []

    def local(host: str):
        def getHost() -> IPv4Address:
            asked.append(host)
            return IPv4Address("TCP", host, 2000)

        return getHost

    for _ in range(2):
        assert policy.allows("chat.example.com:2000", local("192.0.2.1")) is True
        assert policy.allows("localhost", local("192.0.2.1")) is True
        assert policy.allows("127.0.0.1:2000", local("192.0.2.1")) is True
        assert policy.allows("evil.example", local("192.0.2.1")) is False
    assert asked == []
    assert policy.allows("192.0.2.1:2000", local("192.0.2.1")) is True
    assert policy.allows("192.0.2.1:2000", local("192.0.2.2")) is False
    assert asked == ["192.0.2.1", "192.0.2.2"]
