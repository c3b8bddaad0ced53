"""The wire format: how senders are named and relayed messages built."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from wschat.wire import Format, Message, formatAddress, plural, relayPayload


class FormatAddressTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        """An IPv4 peer is named ip:port."""
        self.assertEqual(formatAddress(IPv4Address("TCP", "127.0.0.1", 54321)), "127.0.0.1:54321")

    def test_ipv6(self) -> None:
        """An IPv6 peer is named [ip]:port, so the port stays apart from the address."""
        self.assertEqual(formatAddress(IPv6Address("TCP", "::1", 54321)), "[::1]:54321")

    def test_unix(self) -> None:
        """A UNIX-socket peer has no address to show, and is named 'unix'."""
        self.assertEqual(formatAddress(UNIXAddress(None)), "unix")


class RelayPayloadTests(SynchronousTestCase):
    def test_prefixed(self) -> None:
        """The prefixed format puts the sender's address and ': ' before the text."""
        message = Message("127.0.0.1:1", "héllo".encode())
        self.assertEqual(relayPayload(Format.PREFIXED, message), "127.0.0.1:1: héllo".encode())

    def test_raw(self) -> None:
        """The raw format relays the payload unchanged."""
        message = Message("127.0.0.1:1", b"\x00\xff", isBinary=True)
        self.assertEqual(relayPayload(Format.RAW, message), b"\x00\xff")


@pytest.mark.parametrize(
    ("count", "text"), [(0, "0 connections"), (1, "1 connection"), (2, "2 connections")]
)
def test_plural(count, text):
    """A count agrees with its noun."""
    assert plural(count, "connection") == text
