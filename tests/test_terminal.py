"""
The interactive terminal client: layout, escaping and editing in memory (a pyte screen reading
what the terminal protocol writes), and the real client in a real pseudo-terminal.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import sys
import termios
from collections.abc import Callable

import pyte
import pytest
import pytest_twisted
import wcwidth
from childprocess import findExecutable, freePort
from twisted.internet import defer, utils
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from wschat.terminal import (
    BOLD,
    DIM,
    PALETTE,
    REVERSE,
    ChatTerminal,
    Keyboard,
    LineEditor,
    RoomReader,
    charWidth,
    renderRow,
    safeTokens,
    senderStyle,
    terminalCapabilities,
    textWidth,
    wrapTokens,
)
from wschat.testing import closeAll, connect

# -- pure pieces


def rows(text: str, width: int) -> list[str]:
    return ["".join(t.text for t in row) for row in wrapTokens(safeTokens(text), width)]


@pytest.mark.parametrize(
    "text",
    [
        "a",
        "中",
        "한",
        "Ａ",
        "\u3000",
        "👍",
        "😀",
        "e\u0301",
        "\u200d",
        "\u0301",
        "\u1160",
        "\ufe0f",
    ],
)
def test_width_agrees_with_wcwidth(text):
    """Column widths of CJK, fullwidth, emoji, combining and joining characters match wcwidth."""
    assert textWidth(text) == wcwidth.wcswidth(text)


def test_controls_and_escape_sequences_are_escaped():
    """ESC, BEL, CR, DEL, 8-bit CSI, bidi overrides and line separators print as escapes."""
    text = "a\x1b[2J\x07\r\x7f\x9b\u202e\u2028b"
    shown = "".join(t.text for t in safeTokens(text))
    assert shown == "a\\x1b[2J\\x07\\x0d\\x7f\\x9b\\u202e\\u2028b"
    assert all(ch.isprintable() for t in safeTokens(text) for ch in t.text)
    escaped = [t for t in safeTokens(text) if t.text.startswith("\\")]
    assert escaped and all("7" in t.style.split(";") for t in escaped)


def test_wrap_breaks_at_spaces_and_cuts_long_words():
    """Rows end at the last space that fits; a word longer than a row is cut."""
    assert rows("hello big world", 10) == ["hello big", "world"]
    assert rows("abcdefghijkl", 5) == ["abcde", "fghij", "kl"]
    assert rows("one\ntwo", 10) == ["one", "two"]


def test_wrap_keeps_wide_characters_and_marks_whole():
    """A wide character never straddles two rows; a combining mark stays with its letter."""
    assert rows("ab中中", 5) == ["ab中", "中"]
    assert rows("abcde\u0301f", 5) == ["abcde\u0301", "f"]
    assert all(textWidth(r) <= 5 for r in rows("日本語のテキストです", 5))
    # A mark with nothing before it gets a space to sit on.
    assert rows("\u0301x", 5) == [" \u0301x"]


def test_tabs_expand_to_stops():
    """A tab moves to the next multiple of eight columns."""
    assert rows("a\tb", 20) == ["a       b"]


def test_sender_colour_is_stable_and_off_without_colour():
    """A sender's colour is the same on every call and run; no colour means no style."""
    assert senderStyle("127.0.0.1:5000", True) == senderStyle("127.0.0.1:5000", True)
    assert senderStyle("127.0.0.1:5000", True) in PALETTE
    # zlib.crc32, not the per-process salted hash(): fixed across runs.
    assert senderStyle("127.0.0.1:5000", True) == PALETTE[841329405 % len(PALETTE)]
    assert {senderStyle(f"127.0.0.1:{p}", True) for p in range(5000, 5050)} == set(PALETTE)
    assert senderStyle("127.0.0.1:5000", False) == ""


@pytest.mark.parametrize(
    "environ, terminfo, expected",
    [
        ({"TERM": "xterm-256color"}, (True, 256), (True, True)),
        ({"TERM": "xterm-256color", "NO_COLOR": "1"}, (True, 256), (True, False)),
        ({"TERM": "xterm-256color", "NO_COLOR": ""}, (True, 256), (True, True)),
        ({"TERM": "vt100"}, (True, -1), (True, False)),
        ({"TERM": "dumb"}, (False, -1), (False, False)),
        ({}, None, (False, False)),
        ({"TERM": "some-new-terminal"}, None, (True, True)),
    ],
)
def test_terminal_capabilities(environ, terminfo, expected):
    """Interactive needs cursor movement (not TERM=dumb); colour is off for NO_COLOR and mono."""
    assert terminalCapabilities(environ, lambda term: terminfo) == expected


def test_real_terminfo_knows_dumb_and_vt100():
    """The system's terminfo: dumb cannot move the cursor, vt100 has no colour."""
    import subprocess
    import sys

    code = (
        "import os, sys; from wschat.terminal import terminalCapabilities as t; "
        "print(t(os.environ))"
    )
    out = {
        term: subprocess.run(
            [sys.executable, "-c", code],
            env={"TERM": term},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for term in ("dumb", "vt100", "xterm-256color")
    }
    assert out == {
        "dumb": "(False, False)",
        "vt100": "(True, False)",
        "xterm-256color": "(True, True)",
    }


def typed(text: str, cursor: int | None = None) -> LineEditor:
    editor = LineEditor()
    editor.insert(text)
    if cursor is not None:
        editor.cursor = cursor
    return editor


def test_editor_moves_and_deletes():
    """Left/Right, Home/End, Backspace/Delete edit at the cursor."""
    e = typed("hello")
    e.left()
    e.left()
    e.backspace()
    assert (e.text, e.cursor) == ("helo", 2)
    e.delete()
    assert (e.text, e.cursor) == ("heo", 2)
    e.home()
    e.insert(">")
    e.end()
    e.insert("!")
    assert (e.text, e.cursor) == (">heo!", 5)
    e.right()
    assert e.cursor == 5


def test_editor_kills():
    """Ctrl-U kills to the start, Ctrl-K to the end, Ctrl-W the word before the cursor."""
    e = typed("one two  three", cursor=9)
    e.killWord()
    assert (e.text, e.cursor) == ("one three", 4)
    e.killToEnd()
    assert e.text == "one "
    e.killToStart()
    assert (e.text, e.cursor) == ("", 0)


def test_editor_moves_over_marks_with_their_letter():
    """The cursor never stops between a letter and its combining mark."""
    e = typed("ae\u0301b")
    e.left()
    e.left()
    assert e.cursor == 1
    e.right()
    assert e.cursor == 3
    e.backspace()
    assert e.text == "ab"


def test_editor_drops_control_characters():
    """Pasted control characters never reach the line."""
    assert typed("a\x1b[2Jb\x9b").text == "a[2Jb"


def test_history_keeps_the_draft():
    """Up walks back through lines entered, Down comes back to the line being typed."""
    e = LineEditor()
    for line in ("first", "second", "second", ""):
        e.insert(line)
        e.accept()
    assert list(e.history) == ["first", "second"]
    e.insert("draft")
    e.up()
    assert (e.text, e.cursor) == ("second", 6)
    e.up()
    e.up()
    assert e.text == "first"
    e.down()
    e.down()
    assert e.text == "draft"
    e.down()
    assert e.text == "draft"


def test_window_scrolls_to_keep_the_cursor_visible():
    """A line wider than the input row scrolls sideways; wide characters count double."""
    e = typed("0123456789")
    start, visible, column = e.window(0, 5)
    assert (visible, column) == ("6789", 4)
    e.home()
    start, visible, column = e.window(start, 5)
    assert (start, visible, column) == (0, "01234", 0)
    e = typed("中文中文中文")
    start, visible, column = e.window(0, 6)
    assert column <= 5 and textWidth(visible) <= 6 and visible.endswith("文")


# -- from the room to the screen


class Recorder:
    """A ChatScreen that records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def showMessage(self, sender, text, when, own):
        self.calls.append(("message", sender, text, own))

    def showPresence(self, kind, who, online, when):
        self.calls.append((kind, who, online))

    def showNotice(self, text, important=False):
        self.calls.append(("notice", text, important))

    def showStatus(self, text):
        self.calls.append(("status", text))

    def showConnected(self, you, online):
        self.calls.append(("connected", you, online))


def test_json_objects_to_screen_calls():
    """welcome, message (own marked), join, leave, notice and binary data from wschat.json."""
    screen = Recorder()
    reader = RoomReader(screen)
    reader.connected(True, "127.0.0.1:9")
    t = "2024-05-01T12:00:00.000Z"
    for obj in [
        {"type": "welcome", "you": "127.0.0.1:1", "online": 2, "text": "hi", "time": t},
        {"type": "message", "from": "127.0.0.1:1", "text": "mine", "time": t},
        {"type": "message", "from": "127.0.0.1:2", "text": "theirs", "time": t},
        {"type": "message", "from": "127.0.0.1:2", "data": "AAEC", "time": t},
        {"type": "join", "who": "127.0.0.1:3", "online": 3, "time": t},
        {"type": "leave", "who": "127.0.0.1:3", "online": 2, "time": t},
        {"type": "notice", "text": "not delivered", "time": t},
        {"type": "future-thing"},
    ]:
        reader.received(json.dumps(obj).encode(), False)
    reader.received(b"not json", False)
    assert screen.calls == [
        ("connected", "127.0.0.1:1", 2),
        ("notice", "hi", False),
        ("message", "127.0.0.1:1", "mine", True),
        ("message", "127.0.0.1:2", "theirs", False),
        ("message", "127.0.0.1:2", "<3 bytes of binary data>", False),
        ("join", "127.0.0.1:3", 3),
        ("leave", "127.0.0.1:3", 2),
        ("notice", "not delivered", True),
        ("message", None, "not json", False),
    ]
    refused: list[str] = []
    reader = RoomReader(screen, refused=refused.append)
    reader.connected(True, None)
    reader.received(json.dumps({"type": "notice", "text": "not relayed"}).encode(), False)
    assert refused == ["not relayed"]


def test_plain_prefixed_text_to_screen_calls():
    """Without JSON the prefix names the sender, and the local address marks one's own."""
    screen = Recorder()
    reader = RoomReader(screen)
    reader.connected(False, "127.0.0.1:5")
    for payload in [b"127.0.0.1:5: mine", b"[::1]:6: theirs", b"Welcome", b"unix: x: y"]:
        reader.received(payload, False)
    reader.received(b"\x00\x01", True)
    assert screen.calls == [
        ("connected", None, None),
        ("message", "127.0.0.1:5", "mine", True),
        ("message", "[::1]:6", "theirs", False),
        ("message", None, "Welcome", False),
        ("message", "unix", "x: y", False),
        ("message", None, "<2 bytes of binary data>", False),
    ]


# -- the terminal protocol on an in-memory screen


class Control:
    """A ChatControl that records lines sent and quits."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.quits = 0

    def sendLine(self, text: str) -> None:
        self.sent.append(text)

    def quit(self) -> None:
        self.quits += 1


def pyteColour(style: str) -> str:
    """pyte's name for the foreground colour of an SGR style (30-37 and bright 90-97)."""
    code = int(style)
    return (pyte.graphics.FG_ANSI if code < 90 else pyte.graphics.FG_AIXTERM)[code]


class MemoryTerminal:
    """A ChatTerminal writing to a pyte screen of ``columns`` x ``lines``."""

    def __init__(self, columns: int = 40, lines: int = 10, colour: bool = True) -> None:
        self.screen = pyte.Screen(columns, lines)
        self.stream = pyte.ByteStream(self.screen)
        self.control = Control()
        self.clock = Clock()
        self.ui = ChatTerminal(self.control, lambda: (columns, lines), colour, self.clock)
        self.keyboard = Keyboard(self.ui, lambda: None)
        self.transport = StringTransport()
        self.keyboard.makeConnection(self.transport)
        self.written = b""

    def type(self, data: bytes) -> None:
        self.keyboard.dataReceived(data)

    @property
    def display(self) -> list[str]:
        data = self.transport.value()
        self.transport.clear()
        self.written += data
        self.stream.feed(data)
        return [line.rstrip() for line in self.screen.display]

    @property
    def input(self) -> str:
        """The row the cursor is on: the input line."""
        return self.display[self.screen.cursor.y]

    @property
    def status(self) -> str:
        """The row above the input line: the status bar."""
        return self.display[self.screen.cursor.y - 1]

    def row(self, text: str) -> int:
        return next(y for y, line in enumerate(self.display) if text in line)

    def resize(self, columns: int, lines: int) -> None:
        self.display  # noqa: B018 (what was drawn at the old size)
        self.screen.resize(lines, columns)
        self.ui.terminalSize(columns, lines)


def test_typed_line_survives_incoming_messages():
    """Messages arriving while a line is half typed go above it; the line and cursor stay."""
    t = MemoryTerminal()
    t.ui.showConnected("127.0.0.1:1", 2)
    t.type("half 中文 typed".encode())
    t.type(b"\x1b[D\x1b[D")
    for n in range(15):
        t.ui.showMessage("127.0.0.1:2", f"message {n}", None, False)
    display = t.display
    assert display[-1] == "> half 中文 typed"
    assert t.screen.cursor.y == 9
    assert t.screen.cursor.x == textWidth("> half 中文 typ")
    assert display[-3].endswith("127.0.0.1:2: message 14")
    assert display[-2].startswith(" wschat │ connected │ 2 online")
    t.type(b"\r")
    assert t.control.sent == ["half 中文 typed"]
    assert t.display[-1] == ">"


def test_received_escape_sequences_are_shown_not_obeyed():
    """A message with clear-screen and set-title sequences neither clears nor retitles."""
    t = MemoryTerminal(columns=80)
    t.ui.showMessage("127.0.0.1:2", "before", None, False)
    t.ui.showMessage("127.0.0.1:2", "evil \x1b[2J\x1b]0;title\x07\x1b[H\rend", None, False)
    display = t.display
    assert t.screen.title == ""
    assert any("127.0.0.1:2: before" in line for line in display)
    assert any(line.endswith("evil \\x1b[2J\\x1b]0;title\\x07\\x1b[H\\x0dend") for line in display)


def test_long_messages_wrap_within_the_width():
    """A long message wraps into rows of the terminal's width, wide characters included."""
    t = MemoryTerminal(columns=20)
    t.ui.showMessage("127.0.0.1:2", "言葉" * 12 + " the end", None, False)
    display = t.display
    assert sum("言葉" in line for line in display) >= 3
    assert any(line.endswith("the end") for line in display)
    assert all(wcwidth.wcswidth(line) <= 20 for line in display)


def test_own_messages_and_sender_colours():
    """Own lines say "you" in bold; others' names have their colour, none without colour."""
    t = MemoryTerminal()
    t.ui.showMessage("127.0.0.1:1", "mine", None, True)
    t.ui.showMessage("127.0.0.1:2", "theirs", None, False)
    y = t.row("you: mine")
    x = t.display[y].index("you")
    assert t.screen.buffer[y][x].bold
    y = t.row("theirs")
    x = t.display[y].index("127.0.0.1:2")
    assert t.screen.buffer[y][x].fg == pyteColour(senderStyle("127.0.0.1:2", True))
    plain = MemoryTerminal(colour=False)
    plain.ui.showMessage("127.0.0.1:2", "theirs", None, False)
    y = plain.row("theirs")
    assert {plain.screen.buffer[y][x].fg for x in range(20)} == {"default"}


def test_presence_is_dimmed_and_counts():
    """Join and leave lines are dim (SGR 2) and the status bar shows how many are online."""
    t = MemoryTerminal(columns=60)
    t.ui.showConnected("127.0.0.1:1", 1)
    t.ui.showPresence("join", "127.0.0.1:2", 2, None)
    display = t.display
    assert any(line.endswith("→ 127.0.0.1:2 joined · 2 online") for line in display)
    assert re.search(
        r"\x1b\[2m\d\d:\d\d → 127.0.0.1:2 joined · 2 online\x1b\[0m", t.written.decode()
    )
    assert "2 online" in t.status and "you are 127.0.0.1:1" in t.status
    t.ui.showPresence("leave", "127.0.0.1:2", 1, None)
    assert "1 online" in t.status
    assert t.display[t.screen.cursor.y - 2].endswith("← 127.0.0.1:2 left · 1 online")


def test_retry_countdown():
    """While retrying, the status bar counts the seconds down on the clock."""
    t = MemoryTerminal(columns=70)
    t.ui.showStatus("connection to ws://x refused; retrying in 2.5 s")
    assert "refused; retrying in 3 s" in t.status
    t.clock.advance(0.5)
    assert "retrying in 2 s" in t.status
    t.clock.advance(1)
    assert "retrying in 1 s" in t.status
    t.ui.showStatus("connecting to ws://x")
    t.clock.advance(5)
    assert "connecting to ws://x" in t.status
    assert not t.clock.getDelayedCalls()


def test_commands():
    """/help lists the commands; an unknown one is not sent; //text sends /text; /quit quits."""
    t = MemoryTerminal(columns=80, lines=20)
    t.type(b"/help\r")
    display = "\n".join(t.display)
    for command in ("/help", "/quit", "/clear", "//text"):
        assert command in display
    t.type(b"/qiut\r//shrug\r")
    assert "unknown command /qiut" in "\n".join(t.display)
    assert t.control.sent == ["/shrug"]
    t.type(b"/quit\r")
    assert t.control.quits == 1


@pytest.mark.parametrize("keys", [b"\x04", b"\x03", b"typed\x03"])
def test_ctrl_d_on_empty_line_and_ctrl_c_quit(keys):
    """Ctrl-D on an empty line quits, as does Ctrl-C with or without text."""
    t = MemoryTerminal()
    t.type(keys)
    assert t.control.quits == 1


def test_ctrl_d_in_a_line_deletes():
    """Ctrl-D with text deletes the character under the cursor instead of quitting."""
    t = MemoryTerminal()
    t.type(b"abc\x01\x04")
    assert t.control.quits == 0
    assert t.input == "> bc"


def test_editing_keys_on_the_keyboard():
    """Keys as terminals send them: arrows, Home/End in their variants, Ctrl-W, Ctrl-U."""
    t = MemoryTerminal()
    t.type(b"one two\x1b[H\x1b[3~\x1bOF!\x17\x1b[1~X\x1b[4~Y")
    assert t.input == "> Xne Y"
    t.type(b"\x1b[D\x15")
    assert t.input == "> Y"


def test_resize_repaints_at_the_new_width():
    """After a resize the latest messages are wrapped again and the bars fit the new width."""
    t = MemoryTerminal(columns=60, lines=8)
    t.ui.showMessage("127.0.0.1:2", "word " * 20, None, False)
    t.type(b"draft")
    wide = t.display
    t.resize(24, 8)
    narrow = t.display
    assert narrow != wide
    assert narrow[-1] == "> draft"
    assert narrow[-2].startswith(" wschat │") and wcwidth.wcswidth(narrow[-2]) <= 24
    assert sum(line.startswith("word word") for line in narrow) >= 4
    assert all(wcwidth.wcswidth(line) <= 24 for line in narrow)


def test_nothing_is_drawn_once_closed():
    """closeScreen erases the bars, leaves the status as a plain line; later calls draw nothing."""
    t = MemoryTerminal()
    t.ui.showStatus("closed with code 1000")
    t.display  # noqa: B018
    t.stream.feed(t.ui.closeScreen())
    t.ui.showMessage("127.0.0.1:2", "late", None, False)
    t.type(b"x")
    display = t.display
    assert "wschat: closed with code 1000" in display
    assert not any("late" in line or line.startswith(">") for line in display)


def test_rendered_rows_reset_their_style():
    """Every styled run ends with SGR 0, so no style leaks into the next row."""
    row = wrapTokens(safeTokens("x\x1b", "31"), 10)[0]
    assert renderRow(row) == "\x1b[31mx\x1b[0m\x1b[31;7m\\x1b\x1b[0m"
    assert charWidth("x") == 1


# -- the real client in a real pseudo-terminal

#: How long a test waits for the screen to show something before it fails.
SCREEN_TIMEOUT = 30.0


def setSize(fd: int, columns: int, lines: int) -> None:
    """Set the pty's window size (TIOCSWINSZ); the kernel sends SIGWINCH to its programs."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))


class PtyClient(ProcessProtocol):
    """
    ``python -m wschat.client`` on a pseudo-terminal, its screen read by pyte; tests wait on
    what the screen shows, checked each time the client writes.
    """

    def __init__(self, columns: int, lines: int) -> None:
        self.screen = pyte.Screen(columns, lines)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = b""
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.sttyBefore = ""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.raw += data
        self.stream.feed(data)
        self._check()

    def _check(self) -> None:
        for waiter in list(self._waiters):
            if waiter[0]():
                self._waiters.remove(waiter)
                waiter[1].callback(None)

    @property
    def display(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    @property
    def input(self) -> str:
        return self.display[self.screen.cursor.y]

    @property
    def status(self) -> str:
        return self.display[self.screen.cursor.y - 1]

    def shows(self, text: str) -> bool:
        return any(text in line for line in self.display)

    async def waitUntil(self, condition: Callable[[], bool], what: str) -> None:
        """Wait (bounded) until ``condition`` holds of the screen."""
        from twisted.internet import reactor

        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((condition, d))
        self._check()
        d.addTimeout(SCREEN_TIMEOUT, reactor)
        try:
            await d
        except defer.TimeoutError:
            screen = "\n".join(self.display)
            raise AssertionError(f"the screen never showed {what}:\n{screen}") from None

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))


@pytest.fixture
def pty(tmp_path):
    """
    Start the client on a fresh pty with ``await pty(url, *args, columns=, lines=, env=)``;
    returns the client (with ``sttyBefore``, the pty's ``stty -a`` before the client ran), the
    pty's master fd and its device name. Killed after the test if still running.
    """
    from twisted.internet import reactor

    started: list[tuple[PtyClient, int]] = []

    async def start(url, *args, columns=80, lines=24, env=None):
        master, slave = os.openpty()
        name = os.ttyname(slave)
        setSize(master, columns, lines)
        client = PtyClient(columns, lines)
        client.sttyBefore = await stty(name)
        environment = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/"),
            "LANG": "C.UTF-8",
            "TERM": "xterm-256color",
            **(env or {}),
        }
        argv = [sys.executable, "-m", "wschat.client", "--url", url, *args]
        # A copy of the master keeps the pty there after the client exits, for stty to read.
        keep = os.dup(master)
        reactor.spawnProcess(
            client,
            sys.executable,
            argv,
            env=environment,
            path=str(tmp_path),
            usePTY=(master, slave, name),
        )
        started.append((client, keep))
        return client, keep, name

    yield start
    for client, keep in started:
        if not client.ended.called and client.transport is not None:
            client.transport.signalProcess("KILL")
            pytest_twisted.blockon(client.ended)
        os.close(keep)


async def stty(name: str) -> str:
    """``stty -a`` of the terminal ``name``."""
    out = await utils.getProcessOutput(findExecutable("stty"), ["-a", "-F", name], env=os.environ)
    return out.decode()


async def roomWithTwo(daemon, pty, *args, env=None, columns=80, lines=24):
    """A daemon, a plain client in it, and the terminal client connected."""
    service, url = daemon()
    other = await connect(url)
    await other.nextText()  # the greeting
    client, master, name = await pty(url, *args, env=env, columns=columns, lines=lines)
    await client.waitUntil(lambda: "connected │ 2 online" in client.status, "connected")
    return other, client, master, name


@pytest_twisted.ensureDeferred
async def test_pty_half_typed_line_survives_and_is_sent_whole(daemon, pty):
    """On a real terminal, incoming messages go above a half-typed line, which Enter sends
    whole; Up recalls it."""
    other, client, _, _ = await roomWithTwo(daemon, pty)
    assert client.shows("Welcome to chat! Type a message")
    client.write("half typed 中文".encode())
    await client.waitUntil(lambda: client.input == "> half typed 中文", "the typed text")
    for n in range(30):
        other.sendText(f"incoming {n}")
    await client.waitUntil(lambda: client.shows(f"{other.address}: incoming 29"), "incoming")
    assert client.input == "> half typed 中文"
    assert client.screen.cursor.x == textWidth("> half typed 中文")
    assert client.screen.cursor.y == 23
    client.write(b" line\r")
    await client.waitUntil(lambda: client.shows("you: half typed 中文 line"), "own line")
    assert client.input == ">"
    texts = [await other.nextText() for _ in range(31)]
    assert texts[-1].endswith(": half typed 中文 line")
    assert texts[-1] != f"{other.address}: half typed 中文 line"
    client.write(b"\x1b[A")
    await client.waitUntil(lambda: client.input == "> half typed 中文 line", "Up recalling")
    # Each sender's name in its colour.
    y = next(y for y, line in enumerate(client.display) if "incoming 29" in line)
    assert client.screen.buffer[y][6].fg == pyteColour(senderStyle(other.address, True))
    await defer.ensureDeferred(closeAll([other]))


@pytest_twisted.ensureDeferred
async def test_pty_escape_sequences_neither_clear_nor_retitle(daemon, pty):
    """A received clear-screen and set-title reach the real terminal only as visible text."""
    other, client, _, _ = await roomWithTwo(daemon, pty)
    other.sendText("before")
    await client.waitUntil(lambda: client.shows(": before"), "the first message")
    # Blink on a red background: an SGR this client never writes itself (a sender's name may be
    # plain red, 31, as 1 in 11 addresses hash to it).
    other.sendText("\x1b[2J\x1b]0;title\x07\x1b[5;41m\x9b2J after")
    await client.waitUntil(lambda: client.shows(" after"), "the second message")
    assert client.shows(": before")
    assert client.shows(": \\x1b[2J\\x1b]0;title\\x07\\x1b[5;41m\\x9b2J after")
    assert client.screen.title == ""
    for sequence in (b"\x1b[2J", b"\x1b]", b"\x07", b"\x1b[5;41m", "\x9b".encode()):
        assert sequence not in client.raw
    # Every SGR the client wrote is one of its own styles.
    own = {"0", "", BOLD, DIM, REVERSE, *PALETTE}
    for params in re.findall(rb"\x1b\[([0-9;]*)m", client.raw):
        assert set(params.decode().split(";")) <= own, params
    await defer.ensureDeferred(closeAll([other]))


@pytest_twisted.ensureDeferred
async def test_pty_resize_redraws_at_the_new_width(daemon, pty):
    """After TIOCSWINSZ (and the SIGWINCH it sends) the room is wrapped again at the new width."""
    other, client, master, _ = await roomWithTwo(daemon, pty, columns=80, lines=12)
    words = " ".join(f"w{n:02d}" for n in range(40))
    other.sendText(words)
    await client.waitUntil(lambda: client.shows("w39"), "the long message")
    client.write(b"draft")
    await client.waitUntil(lambda: client.input == "> draft", "the draft")
    client.screen.resize(12, 30)
    setSize(master, 30, 12)

    def rewrapped() -> bool:
        text = " ".join(client.display)
        return all(f"w{n:02d}" in text for n in range(40)) and client.status.startswith(" wschat")

    await client.waitUntil(rewrapped, "the message wrapped at 30 columns")
    assert client.input == "> draft"
    assert all(wcwidth.wcswidth(line) <= 30 for line in client.display)
    await defer.ensureDeferred(closeAll([other]))


def closedWith(code: int) -> defer.Deferred[str]:
    """Fires with the daemon's log line when a connection closes with ``code``."""
    from twisted.internet import reactor
    from twisted.logger import formatEvent

    d: defer.Deferred[str] = defer.Deferred()

    def observe(event):
        text = formatEvent(event)
        if not d.called and re.search(rf"closed: code {code}\b", text):
            d.callback(text)

    globalLogPublisher.addObserver(observe)
    d.addBoth(lambda result: (globalLogPublisher.removeObserver(observe), result)[1])
    return d.addTimeout(SCREEN_TIMEOUT, reactor)


@pytest.mark.parametrize("leave", [b"\x04", b"/quit\r", b"\x03", b"typed\x03", "TERM"], ids=repr)
@pytest_twisted.ensureDeferred
async def test_pty_leaving_closes_1000_and_restores_the_terminal(daemon, pty, leave):
    """Ctrl-D, /quit, Ctrl-C and SIGTERM close with 1000, exit 0 and leave the terminal as
    stty found it."""
    service, url = daemon()
    client, _, name = await pty(url)
    before = client.sttyBefore
    await client.waitUntil(lambda: "connected │ 1 online" in client.status, "connected")
    during = await stty(name)
    assert "-icanon" in during and "-echo " in during and "-isig" in during
    assert "-icanon" not in before and "-echo " not in before
    closed = closedWith(1000)
    if isinstance(leave, str):
        client.transport.signalProcess(leave)
    else:
        client.write(leave)
    assert await client.ended == 0
    await closed
    assert await stty(name) == before
    assert client.display[client.screen.cursor.y - 1].startswith("wschat: closed with code 1000")


#: An SGR sequence that sets a foreground colour.
COLOUR_SGR = re.compile(rb"\x1b\[[0-9;]*\b(3[0-7]|9[0-7])m")


@pytest.mark.parametrize("args, env", [((), {"NO_COLOR": "1"}), (("--no-color",), {})])
@pytest_twisted.ensureDeferred
async def test_pty_no_color(daemon, pty, args, env):
    """NO_COLOR or --no-color: interactive still, but no colour is ever set."""
    other, client, _, _ = await roomWithTwo(daemon, pty, *args, env=env)
    other.sendText("hello")
    await client.waitUntil(lambda: client.shows(": hello"), "the message")
    assert COLOUR_SGR.search(client.raw) is None
    await defer.ensureDeferred(closeAll([other]))


@pytest.mark.parametrize("args, env", [((), {"TERM": "dumb"}), (("--no-tty",), {})])
@pytest_twisted.ensureDeferred
async def test_pty_line_mode_on_a_dumb_terminal_or_no_tty(daemon, pty, args, env):
    """TERM=dumb (no cursor movement) or --no-tty: lines in, lines out, no escape sequences."""
    service, url = daemon()
    other = await connect(url)
    await other.nextText()
    client, _, name = await pty(url, *args, env=env)
    await client.waitUntil(lambda: client.shows("wschat: connected to"), "connected")
    client.write(b"typed line\r")
    relayed = re.compile(r"^127\.0\.0\.1:\d+: typed line$")
    await client.waitUntil(lambda: any(map(relayed.match, client.display)), "the line relayed")
    assert await other.nextText() in client.display
    assert client.shows("typed line")  # the terminal's own echo, in cooked mode
    assert b"\x1b" not in client.raw
    client.write(b"\x04")
    assert await client.ended == 0
    assert await stty(name) == client.sttyBefore
    await defer.ensureDeferred(closeAll([other]))


def test_status_bar_drops_what_does_not_fit():
    """A narrow status bar drops the hints before it cuts the state and the count."""
    t = MemoryTerminal(columns=40)
    t.ui.showConnected("127.0.0.1:50000", 12)
    assert t.status == " wschat │ connected │ 12 online"
    wide = MemoryTerminal(columns=80)
    wide.ui.showConnected("127.0.0.1:50000", 12)
    assert wide.status == " wschat │ connected │ 12 online │ you are 127.0.0.1:50000 │ /help"


@pytest_twisted.ensureDeferred
async def test_pty_status_follows_the_connection_and_presence(daemon, pty):
    """The bar says refused and counts down to the retry, then connected with the count; a line
    typed meanwhile goes out on connecting; joins and leaves are shown."""
    port = freePort()
    client, _, _ = await pty(f"ws://127.0.0.1:{port}")
    retrying = re.compile(rf"connection to ws://127.0.0.1:{port} refused; retrying in \d+ s")
    await client.waitUntil(lambda: bool(retrying.search(client.status)), "retrying")
    client.write(b"typed while away\r")
    await client.waitUntil(lambda: client.shows("not connected"), "the line held")
    service, url = daemon("--port", str(port))
    await client.waitUntil(lambda: "connected │ 1 online" in client.status, "connected")
    await client.waitUntil(lambda: client.shows("you: typed while away"), "the held line")
    other = await connect(url)
    address = other.address
    await client.waitUntil(lambda: client.shows(f"→ {address} joined · 2 online"), "join")
    assert "connected │ 2 online" in client.status
    await defer.ensureDeferred(closeAll([other]))
    await client.waitUntil(lambda: client.shows(f"← {address} left · 1 online"), "leave")


def test_ctrl_l_repaints():
    """Ctrl-L clears the screen and draws the latest messages and the bars again."""
    t = MemoryTerminal()
    t.ui.showMessage("127.0.0.1:2", "kept", None, False)
    t.display  # noqa: B018
    t.stream.feed(b"\x1b[5;1Hjunk")
    t.type(b"x\x0c")
    display = t.display
    assert not any("junk" in line for line in display)
    assert display[0].endswith("127.0.0.1:2: kept")
    assert t.input == "> x"


@pytest_twisted.ensureDeferred
async def test_a_failing_screen_restores_the_terminal_and_exits_1(monkeypatch, capsys):
    """When drawing fails, the terminal is put back, the traceback shown and the exit is 1."""
    from twisted.internet import reactor

    from wschat.terminal import TerminalSession, start

    master, slave = os.openpty()
    setSize(master, 40, 10)
    output = os.dup(slave)
    before = termios.tcgetattr(slave)
    session = TerminalSession(reactor)
    mode = start(reactor, session, colour=False, stdin=slave, stdout=output)
    try:
        assert termios.tcgetattr(slave) != before
        assert session.screen is not None

        def broken(keyID, modifier):
            raise RuntimeError("the screen broke")

        monkeypatch.setattr(session.screen, "_key", broken)
        os.write(master, b"\x1b[A")
        await session.done.addTimeout(SCREEN_TIMEOUT, reactor)
        assert session.exitCode == 1
        assert termios.tcgetattr(slave) == before
        assert "RuntimeError: the screen broke" in capsys.readouterr().err
    finally:
        mode.restore()
        for fd in (master, slave, output):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest_twisted.ensureDeferred
async def test_pty_refused_line_is_said_and_exit_is_3(daemon, pty):
    """A line over the room's limit is not sent, the room says why, and the exit status is 3."""
    service, url = daemon("--max-message-size", "1000")
    client, _, _ = await pty(url)
    await client.waitUntil(lambda: "connected │ 1 online" in client.status, "connected")
    client.write(b"x" * 1500 + b"\r")
    await client.waitUntil(
        lambda: client.shows("line of 1500 bytes not sent: the room accepts at most 1000 bytes"),
        "the refusal",
    )
    client.write(b"short\r")
    await client.waitUntil(lambda: client.shows("you: short"), "the next line")
    client.write(b"\x04")
    assert await client.ended == 3
    assert client.shows("wschat: 1 line not sent or not delivered")


@pytest_twisted.ensureDeferred
async def test_pty_giving_up_restores_the_terminal_and_says_why(pty):
    """With --max-retries, giving up exits 1 with the terminal restored and the reason shown."""
    client, _, name = await pty(f"ws://127.0.0.1:{freePort()}", "--max-retries", "0")
    assert await client.ended == 1
    assert client.shows("refused; giving up after 0 retries")
    assert await stty(name) == client.sttyBefore


@pytest_twisted.ensureDeferred
async def test_pty_cut_connection_resumes_without_duplicates(daemon, pty):
    """The daemon cuts the terminal client's TCP connection while the room keeps talking:
    back, it shows what it missed, and every message once."""
    service, url = daemon("--welcome", "")
    other = await connect(url)
    client, _, _ = await pty(url)
    await client.waitUntil(lambda: "connected │ 2 online" in client.status, "connected")
    other.sendText("before")
    await client.waitUntil(lambda: client.shows(": before"), "before")
    (member,) = [m for m in service.room if getattr(m, "address", None) != other.address]
    member.abort()  # type: ignore[attr-defined]
    for n in range(3):
        other.sendText(f"while away {n}")
    await client.waitUntil(lambda: client.shows(": while away 2"), "what it missed")
    other.sendText("after")
    await client.waitUntil(lambda: client.shows(": after"), "after")
    texts = ["before", "while away 0", "while away 1", "while away 2", "after"]
    shown = [line.split(": ", 1)[1] for line in client.display if f"{other.address}: " in line]
    assert shown == texts
    await defer.ensureDeferred(closeAll([other]))
