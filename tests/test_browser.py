"""
The chat page in a real browser: Debian's Chromium, headless, driven by Playwright.

The daemon and the command-line client run as child processes (``twistd -n wschat`` and
``python -m wschat.client``): Playwright's sync API cannot share a thread with the reactor.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterator

import pytest
from browser import ClientProcess, DaemonProcess, launchChromium
from playwright.sync_api import (
    Browser,
    Page,
    WebSocket,
    WebSocketRoute,
    expect,
    sync_playwright,
)
from prometheus_client.parser import text_string_to_metric_families
from rawws import handshake
from relay import Relay
from tlsfiles import makeTLSFiles

from wschat.bench.frames import serverFrame

WELCOME = "Welcome to chat! Type a message"
XSS = "<img src=x onerror=alert(1)>"
MISSED = "some messages may have been missed"
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
    """
    One page of the chat, with every WebSocket it opened, every frame it received and sent,
    and any dialog it raised.
    """

    def __init__(
        self,
        browser: Browser,
        url: str,
        prepare: Callable[[Page], object] | None = None,
        **contextOptions,
    ) -> None:
        self.page: Page = browser.new_context(**contextOptions).new_page()
        if prepare is not None:
            prepare(self.page)
        self.frames: list[str] = []
        self.sent: list[str] = []
        self.sockets: list[WebSocket] = []
        self.dialogs: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("websocket", self._websocket)
        self.page.goto(url)
        self.state = self.page.locator("#state")
        self.online = self.page.locator("#online")
        expect(self.state).to_have_attribute("data-state", "open")
        expect(self.page.locator("body")).to_have_attribute("data-you", ADDRESS)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _websocket(self, ws: WebSocket) -> None:
        self.sockets.append(ws)
        ws.on("framereceived", self._frame)
        ws.on("framesent", self._sentFrame)

    def _frame(self, payload: str | bytes) -> None:
        self.frames.append(payload if isinstance(payload, str) else payload.decode())

    def _sentFrame(self, payload: str | bytes) -> None:
        self.sent.append(payload if isinstance(payload, str) else payload.decode())

    def received(self, kind: str) -> list[dict]:
        """The JSON objects of type ``kind`` the page received, oldest first."""
        objects = [json.loads(f) for f in self.frames]
        return [o for o in objects if o.get("type") == kind]

    def sends(self, text: str) -> list[dict]:
        """The ``send`` commands the page sent for ``text``."""
        objects = [json.loads(f) for f in self.sent]
        return [o for o in objects if o.get("type") == "send" and o.get("text") == text]

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

    def bubbles(self):
        """Every message shown, pending ones too."""
        return self.page.locator("#log li.msg .bubble")

    def pending(self):
        return self.page.locator("#log li.msg.pending")

    def dividers(self):
        return self.page.locator("#log li.divider")

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


def historyBytes(tab: Tab) -> int:
    """
    What the history window holds for the messages ``tab`` saw: each text and its JSON frame
    (payload and framed copy); no plain frame, as every client in the room speaks JSON.
    """
    messages = [f for f in tab.frames if json.loads(f)["type"] == "message"]
    total = 0
    for frame in messages:
        total += len(json.loads(frame)["text"].encode())
        total += len(frame.encode()) + len(serverFrame(frame.encode()))
    return total


def cliBytes(tab: Tab, cliAddress: str, online: int) -> int:
    """
    What the daemon sent the CLI client (a ``wschat.json`` client under the hood), which
    joined after ``tab``, before any message: its welcome (``tab``'s, naming the CLI) and the
    JSON frame of each message ``tab`` saw.
    """
    welcome = json.loads(tab.frames[0])
    assert (welcome["type"], welcome["seq"]) == ("welcome", 0)
    welcome.update(you=cliAddress, online=online)
    sent = json.dumps(welcome, ensure_ascii=False, separators=(",", ":")).encode()
    messages = [f for f in tab.frames if json.loads(f)["type"] == "message"]
    return len(sent) + sum(len(frame.encode()) for frame in messages)


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
        expectedBytes += cliBytes(a, cliAddress, 3)
        assert len(a.frames) + len(b.frames) + len(cli.output.seen) == 15
        assert metrics(liveDaemon) == {
            ("wschat_connections_open", ()): 3,
            ("wschat_connections_opened_total", ()): 3,
            ("wschat_messages_received_total", ()): 3,
            ("wschat_messages_broadcast_total", ()): 3,
            ("wschat_frames_delivered_total", ()): 15,
            ("wschat_sent_bytes_total", ()): expectedBytes,
            ("wschat_clients_dropped_total", ()): 0,
            ("wschat_history_messages", ()): 3,
            ("wschat_history_bytes", ()): historyBytes(a),
            ("wschat_messages_deduplicated_total", ()): 0,
        }

        # The terminal leaves (end of input: close 1000); the pages hear it.
        assert cli.close() == 0
        for tab in (a, b):
            expect(tab.online).to_have_text("2 online")
            expect(tab.page.locator("#log li.event").last).to_contain_text(f"{cliAddress} left")
        expectedBytes = sum(len(f.encode()) for f in a.frames + b.frames)
        expectedBytes += cliBytes(a, cliAddress, 3)
        after = metrics(liveDaemon)
        assert after == {
            ("wschat_connections_open", ()): 2,
            ("wschat_connections_opened_total", ()): 3,
            ("wschat_connections_closed_total", (("code", "1000"),)): 1,
            ("wschat_messages_received_total", ()): 3,
            ("wschat_messages_broadcast_total", ()): 3,
            ("wschat_frames_delivered_total", ()): 17,
            ("wschat_sent_bytes_total", ()): expectedBytes,
            ("wschat_clients_dropped_total", ()): 0,
            ("wschat_history_messages", ()): 3,
            ("wschat_history_bytes", ()): historyBytes(a),
            ("wschat_messages_deduplicated_total", ()): 0,
        }
    finally:
        cli.kill()
        a.close()
        b.close()


def test_page_reconnects_after_daemon_restart(browser, liveDaemon):
    """
    When the daemon goes away the page says so; what is typed meanwhile shows as pending, and
    is sent once the daemon is back on its port, after a divider: the page cannot know what
    the old daemon relayed after the link went.
    """
    tab = Tab(browser, liveDaemon.httpURL)
    try:
        first = tab.address
        port = liveDaemon.port
        liveDaemon.stop()
        expect(tab.state).to_have_attribute("data-state", "closed")
        expect(tab.state).to_contain_text("retrying in")
        tab.say("typed while away")
        expect(tab.pending().locator(".bubble")).to_have_text("typed while away")

        liveDaemon.start()
        assert liveDaemon.port == port
        expect(tab.state).to_have_attribute("data-state", "open")
        expect(tab.state).to_have_text("connected")
        expect(tab.online).to_have_text("1 online")
        expect(tab.page.locator("body")).not_to_have_attribute("data-you", first)
        expect(tab.pending()).to_have_count(0)

        tab.say("back again")
        expect(tab.bubbles()).to_have_text(["typed while away", "back again"])
        expect(tab.page.locator("#log li:is(.msg, .divider)")).to_have_class(
            ["divider", "msg own", "msg own"]
        )
        expect(tab.dividers()).to_have_text(MISSED)
        assert [w.get("recovered") for w in tab.received("welcome")] == [None, False]
        found = metrics(liveDaemon)
        assert found[("wschat_connections_opened_total", ())] == 1
        assert found[("wschat_messages_broadcast_total", ())] == 2
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


def test_page_shows_recent_history_on_load(browser, liveDaemon, tmp_path):
    """
    A page opened after the room talked shows the room's recent messages, oldest first and as
    text, then live ones; nothing was missed, so no divider.
    """
    cli = ClientProcess(liveDaemon.url, cwd=tmp_path)
    tab = None
    try:
        assert cli.output.next() == WELCOME
        before = ["one", "two", XSS]
        for text in before:
            cli.send(text)
            cliAddress, echoed = cli.output.next().split(": ", 1)
            assert echoed == text
        tab = Tab(browser, liveDaemon.httpURL)
        expect(tab.bubbles()).to_have_text(before)
        expect(tab.page.locator("#log li.msg")).to_have_class(["msg"] * 3)
        expect(tab.page.locator("#log li.msg .from")).to_have_text([cliAddress] * 3)
        assert tab.page.locator("#log img").count() == 0
        assert tab.dialogs == []

        cli.send("three")
        expect(tab.bubbles()).to_have_text([*before, "three"])
        expect(tab.dividers()).to_have_count(0)
        assert [ws.url for ws in tab.sockets] == [liveDaemon.url + "?history=100"]
        assert [m["seq"] for m in tab.received("message")] == [1, 2, 3, 4]
    finally:
        cli.kill()
        if tab is not None:
            tab.close()


def test_page_recovers_what_it_missed_while_cut_off(browser, liveDaemon, tmp_path):
    """
    The page's connection cut at the TCP level while the room talks: back online, it shows
    every message it missed exactly once, in order, with no divider; what was typed while cut
    off stays pending, then is relayed once.
    """
    with Relay(liveDaemon.port) as relay:
        tab = Tab(browser, f"http://127.0.0.1:{relay.port}/")
        cli = ClientProcess(liveDaemon.url, cwd=tmp_path)
        try:
            assert cli.output.next() == WELCOME
            expect(tab.online).to_have_text("2 online")
            cli.send("before")
            cliAddress = cli.output.next().split(": ", 1)[0]
            expect(tab.bubbles()).to_have_text(["before"])

            relay.cut()
            expect(tab.state).to_have_attribute("data-state", "closed")
            missed = [f"missed {i}" for i in range(5)]
            for text in missed:
                cli.send(text)
                assert cli.output.next() == f"{cliAddress}: {text}"
            tab.say("typed offline")
            expect(tab.pending().locator(".bubble")).to_have_text("typed offline")
            expect(tab.bubbles()).to_have_text(["before", "typed offline"])

            relay.restore()
            expect(tab.state).to_have_attribute("data-state", "open")
            expect(tab.bubbles()).to_have_text(["before", *missed, "typed offline"])
            expect(tab.pending()).to_have_count(0)
            expect(tab.lastMessage()).to_have_class("msg own")
            assert cli.output.next() == f"{tab.address}: typed offline"
            cli.send("after")
            assert cli.output.next() == f"{cliAddress}: after"
            expect(tab.bubbles()).to_have_text(["before", *missed, "typed offline", "after"])
            expect(tab.dividers()).to_have_count(0)

            # It resumed from the last message it showed, and the daemon had all since.
            first = tab.received("message")[0]
            assert tab.sockets[-1].url.endswith(f"/?since={first['epoch']}:{first['seq']}")
            assert tab.received("welcome")[-1]["recovered"] is True
            assert len(tab.sends("typed offline")) == 1
            found = metrics(liveDaemon)
            assert found[("wschat_messages_broadcast_total", ())] == 8
            assert found[("wschat_recoveries_total", (("recovered", "true"),))] == 1
        finally:
            cli.kill()
            tab.close()


@pytest.mark.parametrize("lost", ["up", "down"])
def test_page_message_sent_as_the_link_drops_shows_once(browser, liveDaemon, tmp_path, lost):
    """
    A message sent as the link drops (lost on its way to the daemon, ``up``, or relayed but
    its copy lost on the way back, ``down``) shows as pending, then once delivered: the room
    relays it exactly once; the page sends it again, with the same id, only if the room's
    replay did not bring it back.
    """
    with Relay(liveDaemon.port) as relay:
        tab = Tab(browser, f"http://127.0.0.1:{relay.port}/")
        cli = ClientProcess(liveDaemon.url, cwd=tmp_path)
        try:
            assert cli.output.next() == WELCOME
            expect(tab.online).to_have_text("2 online")
            cli.send("before")
            cliAddress = cli.output.next().split(": ", 1)[0]
            expect(tab.bubbles()).to_have_text(["before"])

            relay.swallow(lost)
            with tab.sockets[-1].expect_event("framesent"):
                tab.say("as the link drops")
            if lost == "down":
                assert cli.output.next() == f"{tab.address}: as the link drops"
            expect(tab.pending().locator(".bubble")).to_have_text("as the link drops")
            relay.cut()
            expect(tab.state).to_have_attribute("data-state", "closed")
            relay.restore()
            expect(tab.state).to_have_attribute("data-state", "open")
            expect(tab.pending()).to_have_count(0)
            expect(tab.bubbles()).to_have_text(["before", "as the link drops"])
            expect(tab.lastMessage()).to_have_class("msg own")
            if lost == "up":
                # Sent again by the page's new connection.
                assert cli.output.next() == f"{tab.address}: as the link drops"
            cli.send("after")
            assert cli.output.next() == f"{cliAddress}: after"
            expect(tab.bubbles()).to_have_text(["before", "as the link drops", "after"])

            sends = tab.sends("as the link drops")
            # Sent again after the reconnect only when the replay did not bring it back;
            # always with the same id.
            assert len(sends) == (2 if lost == "up" else 1)
            assert len({s["id"] for s in sends}) == 1
            copies = [m for m in tab.received("message") if m["text"] == "as the link drops"]
            assert [m["id"] for m in copies] == [sends[0]["id"]]
            found = metrics(liveDaemon)
            assert found[("wschat_messages_broadcast_total", ())] == 3
            assert found[("wschat_messages_deduplicated_total", ())] == 0
        finally:
            cli.kill()
            tab.close()


def test_page_marks_where_messages_may_have_been_missed(browser, liveDaemon, tmp_path):
    """
    When the room cannot give back what the page missed (the daemon restarted: a new epoch,
    its messages from while the page was away gone), a divider says so, between what the page
    showed before and what follows.
    """
    tab = Tab(browser, liveDaemon.httpURL)
    cli = None
    try:
        tab.say("before the restart")
        expect(tab.bubbles()).to_have_text(["before the restart"])
        expect(tab.pending()).to_have_count(0)
        liveDaemon.restart()
        cli = ClientProcess(liveDaemon.url, cwd=tmp_path)
        assert cli.output.next() == WELCOME
        cli.send("after the restart")
        cliAddress = cli.output.next().split(": ", 1)[0]
        expect(tab.state).to_have_attribute("data-state", "open")
        expect(tab.bubbles()).to_have_text(["before the restart", "after the restart"])
        expect(tab.page.locator("#log li:is(.msg, .divider)")).to_have_class(
            ["msg own", "divider", "msg"]
        )
        expect(tab.dividers()).to_have_text(MISSED)
        expect(tab.lastMessage().locator(".from")).to_have_text(cliAddress)
        welcomes = tab.received("welcome")
        assert welcomes[-1]["recovered"] is False
        assert welcomes[-1]["epoch"] != welcomes[0]["epoch"]
    finally:
        if cli is not None:
            cli.kill()
        tab.close()


def test_page_joins_a_daemon_with_history_off(browser, tmp_path):
    """
    A daemon with ``--history 0`` refuses the history query (400); the page then joins
    without it, and what it sends shows as pending, then relayed, as before.
    """
    with DaemonProcess(["--history", "0"], cwd=tmp_path) as daemon:
        tab = Tab(browser, daemon.httpURL)
        try:
            assert tab.sockets[0].url == daemon.url + "?history=100"
            assert tab.sockets[-1].url == daemon.url
            tab.say("no history here")
            expect(tab.bubbles()).to_have_text(["no history here"])
            expect(tab.pending()).to_have_count(0)
            expect(tab.lastMessage()).to_have_class("msg own")
            (welcome,) = tab.received("welcome")
            assert "epoch" not in welcome
            (copy,) = tab.received("message")
            assert "seq" not in copy
            assert copy["id"] == tab.sends("no history here")[0]["id"]
        finally:
            tab.close()


class Interposer:
    """
    The page's WebSockets routed through Playwright to the daemon, frame by frame: the test
    can answer what the page sends in the daemon's stead, and put frames of its own in front
    of the page.
    """

    def __init__(self) -> None:
        self.routes: list[WebSocketRoute] = []
        #: When set: what the page sends goes to this instead of the daemon; what it returns,
        #: if anything, goes back to the page.
        self.answer: Callable[[dict], dict | None] | None = None

    def __call__(self, route: WebSocketRoute) -> None:
        server = route.connect_to_server()
        self.routes.append(route)
        route.on_message(lambda frame: self._fromPage(route, server, frame))

    def _fromPage(self, route: WebSocketRoute, server: WebSocketRoute, frame: str | bytes) -> None:
        if self.answer is None:
            server.send(frame)
            return
        reply = self.answer(json.loads(frame))
        if reply is not None:
            route.send(json.dumps(reply))

    def toPage(self, obj: dict) -> None:
        """Put ``obj`` in front of the page, as if its daemon had sent it."""
        self.routes[-1].send(json.dumps(obj))


def test_page_shows_a_message_once_and_takes_duplicate_as_delivered(browser, liveDaemon, tmp_path):
    """
    A message at a position the page already showed is not shown again; a ``duplicate``
    answer for a pending message marks it delivered where it stands; a ``notice`` shows.
    """
    interposer = Interposer()
    tab = Tab(
        browser,
        liveDaemon.httpURL,
        prepare=lambda page: page.route_web_socket(re.compile(".*"), interposer),
    )
    cli = ClientProcess(liveDaemon.url, cwd=tmp_path)
    try:
        assert cli.output.next() == WELCOME
        cli.send("one")
        cliAddress = cli.output.next().split(": ", 1)[0]
        expect(tab.bubbles()).to_have_text(["one"])
        (welcome,) = tab.received("welcome")
        epoch = welcome["epoch"]

        # The same message again (as a daemon that got the page's position wrong would send).
        again = {"type": "message", "from": cliAddress, "text": "one", "time": welcome["time"]}
        interposer.toPage({**again, "epoch": epoch, "seq": 1})
        cli.send("two")
        assert cli.output.next() == f"{cliAddress}: two"
        expect(tab.bubbles()).to_have_text(["one", "two"])
        # Another epoch's message at the same seq is another message.
        interposer.toPage({**again, "text": "elsewhere", "epoch": "f" * 16, "seq": 1})
        expect(tab.bubbles()).to_have_text(["one", "two", "elsewhere"])

        # The daemon answers the page's next send: it had that id already.
        sent: list[dict] = []

        def duplicate(command: dict) -> dict:
            sent.append(command)
            return {"type": "duplicate", "id": command["id"], "epoch": epoch, "seq": 2}

        interposer.answer = duplicate
        tab.say("had it already")
        expect(tab.pending()).to_have_count(0)
        assert [(c["type"], c["text"]) for c in sent] == [("send", "had it already")]
        expect(tab.page.locator("#log li.msg")).to_have_class(["msg", "msg", "msg", "msg own"])
        expect(tab.bubbles()).to_have_text(["one", "two", "elsewhere", "had it already"])
        interposer.answer = None
        cli.send("three")
        assert cli.output.next() == f"{cliAddress}: three"  # nothing relayed in between
        expect(tab.bubbles()).to_have_text(["one", "two", "elsewhere", "had it already", "three"])

        # A notice to this page alone shows as an event line, as text.
        interposer.toPage({"type": "notice", "text": XSS, "time": welcome["time"]})
        expect(tab.page.locator("#log li.event.notice")).to_have_text(
            re.compile(rf"^{re.escape(XSS)} · \d\d:\d\d")
        )
        assert tab.page.locator("#log img").count() == 0
    finally:
        cli.kill()
        tab.close()


def test_page_rejoins_a_daemon_restarted_with_history_off(browser, liveDaemon):
    """
    The daemon comes back with ``--history 0``: it refuses the page's ``since``, so the page
    rejoins without it, marks that messages may have been missed, and sends what was typed.
    """
    tab = Tab(browser, liveDaemon.httpURL)
    try:
        tab.say("with history")
        expect(tab.bubbles()).to_have_text(["with history"])
        expect(tab.pending()).to_have_count(0)
        liveDaemon.stop()
        expect(tab.state).to_have_attribute("data-state", "closed")
        tab.say("typed while away")
        liveDaemon.args = ["--history", "0"]
        liveDaemon.start()
        expect(tab.state).to_have_attribute("data-state", "open")
        expect(tab.pending()).to_have_count(0)
        expect(tab.page.locator("#log li:is(.msg, .divider)")).to_have_class(
            ["msg own", "divider", "msg own"]
        )
        expect(tab.bubbles()).to_have_text(["with history", "typed while away"])
        assert "?since=" in tab.sockets[-2].url
        assert tab.sockets[-1].url == liveDaemon.url
        assert "epoch" not in tab.received("welcome")[-1]
    finally:
        tab.close()


def test_page_ids_without_random_uuid(browser, liveDaemon):
    """
    Where ``crypto.randomUUID`` is missing (it needs a secure context: a page served over
    plain http: from another host), the page's ids come from ``crypto.getRandomValues``.
    """
    tab = Tab(
        browser,
        liveDaemon.httpURL,
        prepare=lambda page: page.add_init_script("delete Crypto.prototype.randomUUID"),
    )
    try:
        assert tab.page.evaluate("typeof crypto.randomUUID") == "undefined"
        tab.say("no uuid here")
        expect(tab.bubbles()).to_have_text(["no uuid here"])
        expect(tab.pending()).to_have_count(0)
        (command,) = tab.sends("no uuid here")
        assert re.fullmatch(r"[0-9a-f]{32}", command["id"])
        (copy,) = tab.received("message")
        assert copy["id"] == command["id"]
    finally:
        tab.close()


def test_page_refuses_to_send_a_message_too_long(browser, tmp_path):
    """
    A message longer than the welcome's ``maxMessageSize`` is not sent (the daemon would close
    the connection, and the page send it again after every reconnect): the page says so, and
    keeps the text in the input.
    """
    with DaemonProcess(["--max-message-size", "200"], cwd=tmp_path) as daemon:
        tab = Tab(browser, daemon.httpURL)
        try:
            assert tab.received("welcome")[0]["maxMessageSize"] == 200
            tab.say("x" * 200)
            notice = tab.page.locator("#log li.notice")
            expect(notice).to_have_text(re.compile(r"^too long to send: 2\d\d bytes, at most 200"))
            expect(tab.page.locator("#text")).to_have_value("x" * 200)
            tab.say("short")
            expect(tab.bubbles()).to_have_text(["short"])
            expect(tab.pending()).to_have_count(0)
            assert [o["text"] for o in map(json.loads, tab.sent)] == ["short"]
            expect(tab.state).to_have_attribute("data-state", "open")
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
