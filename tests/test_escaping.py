"""Text from the room made safe to print (daemon log, client output): controls escaped."""

from __future__ import annotations

import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from rawws import handshake, rawExchange
from twisted.trial.unittest import SynchronousTestCase

from wschat.escaping import escapeControls, unescapeControls
from wschat.testing import connect

#: A message that, logged raw, would start a second line that seems to come from someone else.
SPOOF = "hello\n127.0.0.1:1: I am the admin\r\x1b[31m\x00"
SPOOF_LOGGED = "hello\\n127.0.0.1:1: I am the admin\\r\\x1b[31m\\x00"


def controlFree(text: str) -> bool:
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text)


class EscapeLogTextTests(SynchronousTestCase):
    def test_documented(self) -> None:
        """Backslash, newline, CR, tab have short escapes; other controls, DEL and C1 are \\xHH."""
        cases = {
            "plain text, é and 日本": "plain text, é and 日本",
            "a\\b": "a\\\\b",
            "\n\r\t": "\\n\\r\\t",
            "\x00\x07\x1b\x1f\x7f": "\\x00\\x07\\x1b\\x1f\\x7f",
            "\x80\x9b\x9f\xa0": "\\x80\\x9b\\x9f\xa0",
            SPOOF: SPOOF_LOGGED,
        }
        for text, logged in cases.items():
            self.assertEqual(escapeControls(text), logged)

    @given(st.text())
    def test_reversible(self, text: str) -> None:
        """Any text escapes to one line free of control characters, and unescapes back."""
        logged = escapeControls(text)
        self.assertTrue(controlFree(logged))
        self.assertEqual(unescapeControls(logged), text)


def noRawControls(logged: list[str]) -> bool:
    return all(controlFree(line) for line in logged)


@pytest_twisted.ensureDeferred
async def test_message_body_escaped(daemon, logged):
    """A message with newline, CR, ESC and NUL is logged on one line, escaped."""
    service, url = daemon("--welcome", "")
    client = await connect(url)
    client.sendText(SPOOF)
    assert await client.nextText() == f"{client.address}: {SPOOF}"
    assert f"From client {client.address}: {SPOOF_LOGGED}" in logged
    assert noRawControls(logged)
    client.sendClose(1000)
    await client.closed


@pytest_twisted.ensureDeferred
async def test_close_reason_escaped(daemon, logged):
    """The reason a client gives for closing is logged escaped."""
    service, url = daemon("--welcome", "")
    client = await connect(url)
    address = client.address
    client.sendClose(1000, "bye\r\x1b[2J\n127.0.0.1:1 joined")
    await client.closed
    line = f"Connection from {address} closed: code 1000 bye\\r\\x1b[2J\\n127.0.0.1:1 joined"
    assert line in logged
    assert noRawControls(logged)


@pytest_twisted.ensureDeferred
async def test_refused_origin_escaped(daemon, logged):
    """A refused Origin is quoted escaped, in the log and in the 403 status line."""
    service, url = daemon("--welcome", "")
    origin = "http://evil\x1bc.example\x07"
    request = handshake(f"Origin: {origin}", host=url.split("//")[1])
    status = (await rawExchange(url, request)).split(b"\r\n")[0]
    assert status == b"HTTP/1.1 403 origin http://evil\\x1bc.example\\x07 not allowed"
    assert any("origin http://evil\\x1bc.example\\x07 not allowed" in line for line in logged)
    assert noRawControls(logged)
