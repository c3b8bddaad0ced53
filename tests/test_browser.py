"""
The chat page in a real browser: Debian's Chromium, headless, driven by Playwright.

The daemon and the command-line client run as child processes (``twistd -n wschat`` and
``python -m wschat.client``): Playwright's sync API cannot share a thread with the reactor.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest
from browser import ClientProcess, DaemonProcess, launchChromium
from playwright.sync_api import Browser, Page, expect, sync_playwright
from prometheus_client.parser import text_string_to_metric_families
from rawws import handshake
from tlsfiles import makeTLSFiles

WELCOME = "Welcome to chat! Type a message"
XSS = "<img src=x onerror=alert(1)>"
ADDRESS = re.compile(r"^127\.0\.0\.1:\d+$")

expect.set_options(timeout=30_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launchChromium(playwright)
        yield browser
        browser.close()


@pytest.fixture
def liveDaemon(tmp_path) -> Iterator[DaemonProcess]:
    with DaemonProcess(cwd=tmp_path) as daemon:
        yield daemon


class Tab:
    """One page of the chat, with every WebSocket frame it received and any dialog it raised."""

    def __init__(self, browser: Browser, url: str, **contextOptions) -> None:
        self.page: Page = browser.new_context(**contextOptions).new_page()
        self.frames: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("websocket", lambda ws: ws.on("framereceived", self._frame))
        self.page.goto(url)
        self.state = self.page.locator("#state")
        self.online = self.page.locator("#online")
        expect(self.state).to_have_attribute("data-state", "open")
        expect(self.page.locator("body")).to_have_attribute("data-you", ADDRESS)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _frame(self, payload: str | bytes) -> None:
        self.frames.append(payload if isinstance(payload, str) else payload.decode())

    @property
    def address(self) -> str:
        you = self.page.locator("body").get_attribute("data-you")
        assert you is not None
        return you

    def say(self, text: str) -> None:
        self.page.fill("#text", text)
        self.page.press("#text", "Enter")

    def lastMessage(self):
        return self.page.locator("#log li.msg").last

    def close(self) -> None:
        self.page.context.close()


def metrics(daemon: DaemonProcess) -> dict[tuple[str, tuple], float]:
    text = daemon.get("/metrics").decode("utf-8")
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("wschat_") and not s.name.endswith("_created"):
                found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def test_two_pages_and_cli_client_chat(browser, liveDaemon, tmp_path):
    """Two pages and the CLI client share the room both ways; markup shows as text; counted."""
    a = Tab(browser, liveDaemon.httpURL)
    expect(a.online).to_have_text("1 online")
    b = Tab(browser, liveDaemon.httpURL, viewport={"width": 360, "height": 640})
    expect(a.online).to_have_text("2 online")
    cli = ClientProcess(liveDaemon.url, cwd=tmp_path)
    try:
        assert cli.output.next() == WELCOME
        for tab in (a, b):
            expect(tab.online).to_have_text("3 online")

        # A page speaks: the other page, and the terminal, hear it; A's own is marked.
        a.say("hello from A")
        assert cli.output.next() == f"{a.address}: hello from A"
        mine, theirs = a.lastMessage(), b.lastMessage()
        expect(mine).to_have_class("msg own")
        expect(mine.locator(".bubble")).to_have_text("hello from A")
        expect(mine.locator(".from")).to_have_text("you")
        expect(theirs).to_have_class("msg")
        expect(theirs.locator(".from")).to_have_text(a.address)
        expect(theirs.locator(".bubble")).to_have_text("hello from A")
        expect(theirs.locator("time")).to_have_text(re.compile(r"\d\d:\d\d"))

        # The terminal speaks: both pages show it, with its address.
        cli.send("hello from the terminal")
        echo = cli.output.next()
        cliAddress, text = echo.split(": ", 1)
        assert ADDRESS.match(cliAddress)
        assert text == "hello from the terminal"
        for tab in (a, b):
            expect(tab.lastMessage().locator(".from")).to_have_text(cliAddress)
            expect(tab.lastMessage().locator(".bubble")).to_have_text("hello from the terminal")

        # Markup is text: shown literally, no element made, nothing run.
        b.say(XSS)
        assert cli.output.next() == f"{b.address}: {XSS}"
        for tab in (a, b):
            expect(tab.lastMessage().locator(".bubble")).to_have_text(XSS)
            assert tab.page.locator("#log img").count() == 0
            assert tab.dialogs == []

        # At phone width the page does not scroll sideways.
        width = b.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 360

        # What /metrics counted: 3 connections; 3 messages, each to 3 clients; greetings
        # (3) and join events (A heard B and the CLI join, B heard the CLI): 15 frames.
        expectedBytes = sum(len(f.encode()) for f in a.frames + b.frames)
        expectedBytes += sum(len(line.encode()) for line in cli.output.seen)
        assert len(a.frames) + len(b.frames) + len(cli.output.seen) == 15
        assert metrics(liveDaemon) == {
            ("wschat_connections_open", ()): 3,
            ("wschat_connections_opened_total", ()): 3,
            ("wschat_messages_received_total", ()): 3,
            ("wschat_messages_broadcast_total", ()): 3,
            ("wschat_frames_delivered_total", ()): 15,
            ("wschat_sent_bytes_total", ()): expectedBytes,
            ("wschat_clients_dropped_total", ()): 0,
        }

        # The terminal leaves (end of input: close 1000); the pages hear it.
        assert cli.close() == 0
        for tab in (a, b):
            expect(tab.online).to_have_text("2 online")
            expect(tab.page.locator("#log li.event").last).to_contain_text(f"{cliAddress} left")
        expectedBytes = sum(len(f.encode()) for f in a.frames + b.frames)
        expectedBytes += sum(len(line.encode()) for line in cli.output.seen)
        after = metrics(liveDaemon)
        print(liveDaemon.get("/metrics").decode("utf-8"))
        assert after == {
            ("wschat_connections_open", ()): 2,
            ("wschat_connections_opened_total", ()): 3,
            ("wschat_connections_closed_total", (("code", "1000"),)): 1,
            ("wschat_messages_received_total", ()): 3,
            ("wschat_messages_broadcast_total", ()): 3,
            ("wschat_frames_delivered_total", ()): 17,
            ("wschat_sent_bytes_total", ()): expectedBytes,
            ("wschat_clients_dropped_total", ()): 0,
        }
    finally:
        cli.kill()
        a.close()
        b.close()


def test_page_reconnects_after_daemon_restart(browser, liveDaemon):
    """When the daemon goes away the page says so, and rejoins when it is back on its port."""
    tab = Tab(browser, liveDaemon.httpURL)
    try:
        first = tab.address
        port = liveDaemon.port
        liveDaemon.stop()
        expect(tab.state).to_have_attribute("data-state", "closed")
        expect(tab.state).to_contain_text("retrying in")
        expect(tab.page.locator("#send")).to_be_disabled()

        liveDaemon.start()
        assert liveDaemon.port == port
        expect(tab.state).to_have_attribute("data-state", "open")
        expect(tab.state).to_have_text("connected")
        expect(tab.online).to_have_text("1 online")
        expect(tab.page.locator("body")).not_to_have_attribute("data-you", first)

        tab.say("back again")
        expect(tab.lastMessage()).to_have_class("msg own")
        expect(tab.lastMessage().locator(".bubble")).to_have_text("back again")
        found = metrics(liveDaemon)
        assert found[("wschat_connections_opened_total", ())] == 1
        assert found[("wschat_messages_broadcast_total", ())] == 1
    finally:
        tab.close()


def test_page_shows_presence_summary(browser, liveDaemon):
    """Under churn the page shows a summed-up presence line and keeps the online count right."""
    tab = Tab(browser, liveDaemon.httpURL)
    try:
        host = f"127.0.0.1:{liveDaemon.port}"
        for _ in range(30):
            with socket.create_connection(("127.0.0.1", liveDaemon.port)) as s:
                s.sendall(handshake(host=host))
                answer = b""
                while b"\r\n\r\n" not in answer:
                    answer += s.recv(4096)
                assert answer.startswith(b"HTTP/1.1 101 "), answer
        summary = tab.page.locator("#log li.event", has_text=re.compile(r"\d+ joined, \d+ left"))
        expect(summary.first).to_be_visible()
        expect(tab.online).to_have_text("1 online")
        assert any('"type":"presence"' in frame for frame in tab.frames)
    finally:
        tab.close()


def test_page_over_https_chats_with_cli_over_wss(browser, tmp_path):
    """
    The page loaded over https:// (Chromium offers ALPN) joins the room over wss://, and chats
    both ways with the CLI client connected over wss:// with the test's CA.
    """
    files = makeTLSFiles(tmp_path)
    with DaemonProcess(["--listen", files.listen()], cwd=tmp_path) as daemon:
        tab = Tab(browser, f"https://127.0.0.1:{daemon.port}/", ignore_https_errors=True)
        url = f"wss://localhost:{daemon.port}/"
        cli = ClientProcess(url, cwd=tmp_path, args=["--ca-file", str(files.ca)])
        try:
            assert cli.output.next() == WELCOME
            expect(tab.online).to_have_text("2 online")
            tab.say("hello over https")
            assert cli.output.next() == f"{tab.address}: hello over https"
            cli.send("hello over wss")
            cliAddress = cli.output.next().split(": ", 1)[0]
            expect(tab.lastMessage().locator(".from")).to_have_text(cliAddress)
            expect(tab.lastMessage().locator(".bubble")).to_have_text("hello over wss")
            assert cli.close() == 0
        finally:
            cli.kill()
            tab.close()
