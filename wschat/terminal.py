"""
The client's interactive mode: the room scrolls above a status bar and an input line that keeps
what you type. ``python -m wschat.client`` uses it when standard input and output are a terminal.

Why insults (``StandardIO`` + ``ServerProtocol``): Twisted's own, on the default reactor, no new
dependency (prompt_toolkit needs the asyncio reactor); recvline counts bytes as columns, hence ours.

The pieces, top to bottom:

- pure functions: :func:`charWidth` (from the standard library's Unicode tables),
  :func:`safeTokens` (control characters and escape sequences become visible text such as
  ``\\x1b``, never terminal control), :func:`wrapTokens`, :func:`senderStyle`,
  :func:`terminalCapabilities`; and :class:`LineEditor`, the input line;
- :class:`ChatScreen` (what a chat session tells the terminal) and :class:`ChatControl` (what the
  terminal asks of the session: send a line, quit), the interface between the two;
- :class:`ChatTerminal`, the insults terminal protocol that draws, and :class:`Keyboard`, its
  ``ServerProtocol``;
- :class:`RoomReader` (room payloads, JSON or plain, to :class:`ChatScreen` calls),
  :class:`TerminalSession` (the client's session with the terminal as its output) and
  :func:`start`, which puts the terminal in raw mode and always restores it.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import math
import os
import re
import signal
import sys
import termios
import time
import tty
import unicodedata
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from autobahn.twisted.websocket import connectWS
from twisted.conch.insults.insults import ServerProtocol, TerminalProtocol
from twisted.internet import fdesc, stdio
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from wschat.client import (
    ChatClientFactory,
    ChatClientProtocol,
    ChatSession,
    stderrStatus,
    tlsOptions,
)
from wschat.wire import JSON_SUBPROTOCOL, formatAddress

# -- what a terminal shows


def charWidth(ch: str) -> int:
    """
    Columns a terminal gives the printable character ``ch``: 0 (combining marks, zero-width
    joiners), 2 (East Asian wide and fullwidth, which covers CJK and most emoji) or 1.
    """
    category = unicodedata.category(ch)
    if category in ("Mn", "Me") or (category == "Cf" and ch != "\u00ad"):
        return 0
    if "\u1160" <= ch <= "\u11ff":
        # Hangul medial vowels and final consonants join the syllable before them.
        return 0
    if unicodedata.east_asian_width(ch) in ("W", "F"):
        return 2
    return 1


def textWidth(text: str) -> int:
    """Columns ``text`` (printable characters only) takes."""
    return sum(charWidth(ch) for ch in text)


# Bidirectional embeddings, overrides and isolates reorder what follows them on terminals that
# do bidi: shown escaped, like control characters.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def isUnsafe(ch: str) -> bool:
    """
    True for what a terminal might act on instead of showing: C0 and C1 controls (ESC, CSI,
    OSC, BEL, CR, ...), DEL, line and paragraph separators, bidi controls, lone surrogates.
    """
    o = ord(ch)
    if o < 0x20 or 0x7F <= o <= 0x9F:
        return True
    return ch in _BIDI_CONTROLS or unicodedata.category(ch) in ("Zl", "Zp", "Cs")


def escapeChar(ch: str) -> str:
    """How an unsafe character is shown: ``\\x1b``, ``\\u202e``."""
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


#: SGR parameters (``ESC [ ... m``) of the styles used.
BOLD = "1"
DIM = "2"
REVERSE = "7"

#: Sender colours (red, green, yellow, blue, magenta, cyan and their bright forms but bright
#: yellow): readable on dark and light backgrounds alike.
PALETTE = ("31", "32", "33", "34", "35", "36", "91", "92", "94", "95", "96")


def senderStyle(sender: str, colour: bool) -> str:
    """
    The SGR style of ``sender``'s name: one of :data:`PALETTE`, the same in every run and on
    every client (a CRC of the name, not Python's salted ``hash``); plain without colour.
    """
    if not colour:
        return ""
    return PALETTE[zlib.crc32(sender.encode("utf-8")) % len(PALETTE)]


@dataclass(frozen=True, slots=True)
class Token:
    """
    One unit of layout: a printable character, a tab or newline, or an escaped unsafe
    character (never split across rows).
    """

    text: str
    style: str
    width: int


#: Tab stops are every this many columns of a message's text.
TAB = 8


def safeTokens(text: str, style: str = "") -> list[Token]:
    """
    ``text`` as tokens that only print: unsafe characters become their escape in reverse video.
    Tabs and newlines stay (as width-0 tokens) for :func:`wrapTokens` to lay out.
    """
    tokens = []
    for ch in text:
        if ch in "\t\n":
            tokens.append(Token(ch, style, 0))
        elif isUnsafe(ch):
            escaped = escapeChar(ch)
            tokens.append(Token(escaped, _join(style, REVERSE), len(escaped)))
        else:
            tokens.append(Token(ch, style, charWidth(ch)))
    return tokens


def _join(*styles: str) -> str:
    return ";".join(s for s in styles if s)


Row = list[Token]


def wrapTokens(tokens: Iterable[Token], width: int) -> list[Row]:
    """
    Lay ``tokens`` out in rows of at most ``width`` columns: at newlines, and where a row is
    full, after its last space if it has one (a word longer than a row is cut). A wide character
    never straddles two rows; a zero-width mark stays with the character before it.
    """
    width = max(width, 2)
    rows: list[Row] = [[]]
    column = 0
    for token in tokens:
        row = rows[-1]
        if token.text == "\n":
            rows.append([])
            column = 0
            continue
        if token.text == "\t":
            spaces = min(TAB - column % TAB, width - column) or 1
            token = Token(" " * spaces, token.style, spaces)
        if token.width == 0 and not row:
            # A combining mark with nothing to combine with would join whatever is on screen.
            row.append(Token(" ", token.style, 1))
            column = 1
        if column + token.width > width:
            breakAt = _lastSpace(row)
            if breakAt is None:
                rows.append([])
            else:
                rows.append(row[breakAt + 1 :])
                del row[breakAt:]
            row = rows[-1]
            column = sum(t.width for t in row)
        row.append(token)
        column += token.width
    return rows


def _lastSpace(row: Row) -> int | None:
    for index in range(len(row) - 1, 0, -1):
        if row[index].text == " ":
            return index
    return None


def renderRow(row: Row) -> str:
    """The text to write for ``row``, each style run wrapped in SGR on / reset."""
    out = []
    style = ""
    for token in row:
        if token.style != style:
            if style:
                out.append("\x1b[0m")
            if token.style:
                out.append(f"\x1b[{token.style}m")
            style = token.style
        out.append(token.text)
    if style:
        out.append("\x1b[0m")
    return "".join(out)


def fitTokens(tokens: Iterable[Token], width: int) -> Row:
    """The tokens of one row cut to ``width`` columns, ending in ``…`` when cut."""
    items = [t for t in tokens if t.text not in "\t\n"]
    if sum(t.width for t in items) <= width:
        return items
    row: Row = []
    column = 0
    for token in items:
        if column + token.width > width - 1:
            break
        row.append(token)
        column += token.width
    return row + [Token("…", row[-1].style if row else "", 1)]


# -- which terminals get what


def terminalCapabilities(
    environ: Mapping[str, str], lookup: Callable[[str], tuple[bool, int] | None] | None = None
) -> tuple[bool, bool]:
    """
    ``(interactive, colour)`` for the terminal ``environ`` describes.

    Interactive needs cursor movement: not with ``TERM`` unset, empty or ``dumb`` (Emacs'
    shell, some IDE consoles), nor a terminal whose terminfo entry has no cursor addressing.
    Colour is off under ``NO_COLOR`` (any non-empty value, https://no-color.org) and for
    terminals terminfo says have none (``vt100``, ``xterm-mono``). A terminal terminfo does
    not know is taken to be a colour xterm, as nearly all terminals are.
    """
    term = environ.get("TERM", "")
    if term in ("", "dumb"):
        return False, False
    found = (lookup or _terminfo)(term)
    movable, colours = found if found is not None else (True, 8)
    return movable, movable and colours >= 8 and not environ.get("NO_COLOR")


def _terminfo(term: str) -> tuple[bool, int] | None:
    try:
        import curses

        curses.setupterm(term, sys.__stdout__.fileno() if sys.__stdout__ else 1)
        return curses.tigetstr("cup") is not None, curses.tigetnum("colors")
    except Exception:
        return None


# -- the input line


class LineEditor:
    """
    The line being typed, the cursor in it, and the history of lines entered.

    The cursor moves over a character together with the zero-width marks after it, so it never
    stands inside an accented letter or an emoji sequence. Up and Down walk the history; the
    line being typed is kept and comes back below the newest entry.
    """

    def __init__(self, historySize: int = 500) -> None:
        self.text = ""
        self.cursor = 0
        self.history: deque[str] = deque(maxlen=historySize)
        # Where Up/Down are in the history (len(history): the line being typed), and that line.
        self._position = 0
        self._draft = ""

    def _prev(self, index: int) -> int:
        index = max(index - 1, 0)
        while index > 0 and charWidth(self.text[index]) == 0:
            index -= 1
        return index

    def _next(self, index: int) -> int:
        index = min(index + 1, len(self.text))
        while index < len(self.text) and charWidth(self.text[index]) == 0:
            index += 1
        return index

    def insert(self, text: str) -> None:
        text = "".join(ch for ch in text if not isUnsafe(ch))
        self.text = self.text[: self.cursor] + text + self.text[self.cursor :]
        self.cursor += len(text)

    def left(self) -> None:
        self.cursor = self._prev(self.cursor)

    def right(self) -> None:
        self.cursor = self._next(self.cursor)

    def home(self) -> None:
        self.cursor = 0

    def end(self) -> None:
        self.cursor = len(self.text)

    def backspace(self) -> None:
        start = self._prev(self.cursor)
        self.text = self.text[:start] + self.text[self.cursor :]
        self.cursor = start

    def delete(self) -> None:
        end = self._next(self.cursor)
        self.text = self.text[: self.cursor] + self.text[end:]

    def killToStart(self) -> None:
        """Ctrl-U: delete from the start of the line to the cursor."""
        self.text = self.text[self.cursor :]
        self.cursor = 0

    def killToEnd(self) -> None:
        """Ctrl-K: delete from the cursor to the end of the line."""
        self.text = self.text[: self.cursor]

    def killWord(self) -> None:
        """Ctrl-W: delete the word before the cursor and the spaces after it."""
        start = self.cursor
        while start > 0 and self.text[start - 1].isspace():
            start -= 1
        while start > 0 and not self.text[start - 1].isspace():
            start -= 1
        self.text = self.text[:start] + self.text[self.cursor :]
        self.cursor = start

    def up(self) -> None:
        if self._position == 0:
            return
        if self._position == len(self.history):
            self._draft = self.text
        self._position -= 1
        self._show(self.history[self._position])

    def down(self) -> None:
        if self._position >= len(self.history):
            return
        self._position += 1
        entry = self._draft if self._position == len(self.history) else self.history[self._position]
        self._show(entry)

    def _show(self, text: str) -> None:
        self.text = text
        self.cursor = len(text)

    def accept(self) -> str:
        """The line entered (Enter): remembered in the history unless empty or a repeat."""
        line = self.text
        if line and (not self.history or self.history[-1] != line):
            self.history.append(line)
        self.text = self._draft = ""
        self.cursor = 0
        self._position = len(self.history)
        return line

    def window(self, start: int, width: int) -> tuple[int, str, int]:
        """
        What of the line to show in ``width`` columns, scrolled from ``start`` as little as
        keeps the cursor in view: ``(start, visible text, cursor column)``.
        """
        width = max(width, 1)
        cursor = self.cursor
        if cursor < start:
            start = cursor
        # Columns from start to the cursor, counted back from the cursor no further than needed.
        begin, used = cursor, 0
        while begin > start:
            w = charWidth(self.text[begin - 1])
            if used + w > width - 1:
                break
            begin -= 1
            used += w
        if begin > start:
            start = begin
            while start < len(self.text) and charWidth(self.text[start]) == 0:
                start += 1
        visible, column, end = [], 0, start
        while end < len(self.text):
            w = charWidth(self.text[end])
            if column + w > width:
                break
            visible.append(self.text[end])
            column += w
            end += 1
        return start, "".join(visible), textWidth(self.text[start:cursor])


# -- the interface between a chat session and the terminal


class ChatScreen(Protocol):
    """What a chat session tells the terminal."""

    def showMessage(self, sender: str | None, text: str, when: float | None, own: bool) -> None:
        """A room message (``sender`` None when the room's format names nobody)."""

    def showPresence(self, kind: str, who: str, online: int, when: float | None) -> None:
        """``who`` joined or left (``kind``); ``online`` are connected now."""

    def showNotice(self, text: str, important: bool = False) -> None:
        """A line from the server or the client itself (important: from the server)."""

    def showStatus(self, text: str) -> None:
        """The connection's state in words: connecting, refused and retrying in N s, closed."""

    def showConnected(self, you: str | None, online: int | None) -> None:
        """Connected, as ``you`` (when known), with ``online`` connected (when known)."""


class ChatControl(Protocol):
    """What the terminal asks of the chat session."""

    def sendLine(self, text: str) -> None:
        """Send a line the user entered to the room."""

    def quit(self) -> None:
        """Leave: close the connection (1000) and stop."""


# -- drawing


HELP = """\
Commands:
  /help        this list
  /quit        leave (also Ctrl-D on an empty line, or Ctrl-C)
  /clear       clear the screen
  //text       send a line that starts with /
Keys: Left/Right, Home/End (Ctrl-A/Ctrl-E), Backspace/Delete, Ctrl-U, Ctrl-K, Ctrl-W,
Up/Down recall lines sent, Ctrl-L redraws."""

PROMPT = "> "

#: How many past entries are kept to repaint the screen after a resize: more than a screen
#: holds, and few enough that entries of the largest messages stay small in memory.
REPAINT_ENTRIES = 200

#: A run of text in one style, and an entry (a message, an event, a notice) made of them.
Segment = tuple[str, str]
Entry = list[Segment]


def entryTokens(entry: Entry) -> list[Token]:
    """The tokens of an entry's segments, unsafe characters escaped."""
    return [token for text, style in entry for token in safeTokens(text, style)]


_RETRYING = re.compile(r"retrying in (\d+(?:\.\d+)?) s")

_KEY_ALIASES = {
    b"\x1b[OA": ServerProtocol.UP_ARROW,  # type: ignore[attr-defined]
    b"\x1b[OB": ServerProtocol.DOWN_ARROW,  # type: ignore[attr-defined]
    b"\x1b[OC": ServerProtocol.RIGHT_ARROW,  # type: ignore[attr-defined]
    b"\x1b[OD": ServerProtocol.LEFT_ARROW,  # type: ignore[attr-defined]
    b"\x1b[OH": ServerProtocol.HOME,  # type: ignore[attr-defined]
    b"\x1b[OF": ServerProtocol.END,  # type: ignore[attr-defined]
    b"\x1b[7~": ServerProtocol.HOME,  # type: ignore[attr-defined]
    b"\x1b[8~": ServerProtocol.END,  # type: ignore[attr-defined]
}


class ChatTerminal(TerminalProtocol):
    """
    The chat on a terminal: entries scroll up above two rows it owns at the bottom, the status
    bar and the input line, which it redraws after printing anything.

    The screen is never cleared but on a resize or Ctrl-L, so the terminal's own scrollback
    keeps the conversation. Between draws the cursor is on the input line.

    @param control: where entered lines and quitting go.
    @param size: the terminal's ``(columns, rows)`` now.
    @param colour: whether senders get colours.
    @param clock: runs the retry countdown.
    """

    terminal: ServerProtocol

    def __init__(
        self,
        control: ChatControl,
        size: Callable[[], tuple[int, int]],
        colour: bool,
        clock: IReactorTime,
    ) -> None:
        self.control = control
        self.colour = colour
        self._clock = clock
        self.editor = LineEditor()
        self.width, self.height = size()
        # Kept as text, not laid out: a token per character would be many times the size.
        self._entries: deque[Entry] = deque(maxlen=REPAINT_ENTRIES)
        self._bottomShown = False
        self._scroll = 0
        self._typed = b""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.status = "connecting"
        self.online: int | None = None
        self.you: str | None = None
        #: Set once the terminal is handed back: nothing is drawn after that.
        self.closed = False
        self._retryAt: float | None = None
        self._countdown: IDelayedCall | None = None
        self.quitting = False

    # -- ITerminalProtocol

    def connectionMade(self) -> None:
        self._write("\r")
        self._showBottom()

    def keystrokeReceived(self, keyID: bytes, modifier: object) -> None:
        if len(keyID) == 1 and modifier is None and (keyID >= b" " and keyID != b"\x7f"):
            # Printable bytes (UTF-8 too) gather until the end of the read, then go in at once.
            self._typed += keyID
            return
        self.inputDone()
        self._key(keyID, modifier)
        self._drawInput()

    def unhandledControlSequence(self, seq: bytes) -> None:
        key = _KEY_ALIASES.get(seq)
        if key is not None:
            self.keystrokeReceived(key, None)

    def terminalSize(self, width: int, height: int) -> None:
        """The terminal was resized: repaint everything at the new size."""
        self.width, self.height = width, height
        self.repaint()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._stopCountdown()

    # -- keys

    def inputDone(self) -> None:
        """The end of a read from the keyboard: put what was typed in the line, then draw."""
        if self._typed:
            typed, self._typed = self._typed, b""
            self.editor.insert(self._decoder.decode(typed))
        self._drawInput()

    def _key(self, keyID: bytes, modifier: object) -> None:
        t = self.terminal
        e = self.editor
        keys: dict[bytes, Callable[[], None]] = {
            t.LEFT_ARROW: e.left,  # type: ignore[attr-defined]
            t.RIGHT_ARROW: e.right,  # type: ignore[attr-defined]
            t.HOME: e.home,  # type: ignore[attr-defined]
            t.END: e.end,  # type: ignore[attr-defined]
            t.DELETE: e.delete,  # type: ignore[attr-defined]
            t.UP_ARROW: e.up,  # type: ignore[attr-defined]
            t.DOWN_ARROW: e.down,  # type: ignore[attr-defined]
            b"\x7f": e.backspace,
            b"\x08": e.backspace,
            b"\x01": e.home,
            b"\x05": e.end,
            b"\x02": e.left,
            b"\x06": e.right,
            b"\x10": e.up,
            b"\x0e": e.down,
            b"\x15": e.killToStart,
            b"\x0b": e.killToEnd,
            b"\x17": e.killWord,
            b"\x0c": self.repaint,
            b"\x03": self.quit,
            b"\r": self._enter,
            b"\n": self._enter,
        }
        if modifier is not None:
            if keyID == b"\x7f":
                e.killWord()
            return
        if keyID == b"\x04":
            if e.text:
                e.delete()
            else:
                self.quit()
            return
        action = keys.get(keyID)
        if action is not None:
            action()

    def _enter(self) -> None:
        line = self.editor.accept()
        self._scroll = 0
        if not line:
            return
        if line.startswith("//"):
            self.control.sendLine(line[1:])
        elif line.startswith("/"):
            self._command(line)
        else:
            self.control.sendLine(line)

    def _command(self, line: str) -> None:
        name = line.split()[0]
        if name in ("/quit", "/exit"):
            self.quit()
        elif name == "/help":
            self.showNotice(HELP)
        elif name == "/clear":
            self._entries.clear()
            self.repaint()
        else:
            self.showNotice(f"unknown command {name}: /help lists them; //text sends /text")

    def quit(self) -> None:
        if not self.quitting:
            self.quitting = True
            self.showStatus("leaving")
            self.control.quit()

    # -- ChatScreen

    def showMessage(self, sender: str | None, text: str, when: float | None, own: bool) -> None:
        entry = [self._stamp(when)]
        if sender is not None:
            name = "you" if own else sender
            entry += [(name, BOLD if own else senderStyle(sender, self.colour)), (": ", "")]
        self._print(entry + [(text, "")])

    def showPresence(self, kind: str, who: str, online: int, when: float | None) -> None:
        arrow = "→" if kind == "join" else "←"
        verb = "joined" if kind == "join" else "left"
        people = "1 online" if online == 1 else f"{online} online"
        self.online = online
        self._print([self._stamp(when), (f"{arrow} {who} {verb} · {people}", DIM)])
        self._drawStatus()

    def showNotice(self, text: str, important: bool = False) -> None:
        self._print([self._stamp(None), (text, BOLD if important else DIM)])

    def showStatus(self, text: str) -> None:
        self.status = text
        self._stopCountdown()
        match = _RETRYING.search(text)
        if match:
            self._retryAt = self._clock.seconds() + float(match.group(1))
            self._tick()
        self._drawStatus()

    def showConnected(self, you: str | None, online: int | None) -> None:
        self._stopCountdown()
        self.status = "connected"
        self.you = you
        self.online = online
        self._drawStatus()

    # -- drawing

    def _write(self, data: str | bytes) -> None:
        # (insults' write turns each "\n" into "\r\n".)
        if not self.closed:
            self.terminal.write(data)

    def _stamp(self, when: float | None) -> Segment:
        return (time.strftime("%H:%M ", time.localtime(when)), DIM)

    def _print(self, entry: Entry) -> None:
        self._entries.append(entry)
        self._hideBottom()
        for row in wrapTokens(entryTokens(entry), self.width):
            self._write(renderRow(row) + "\n")
        self._showBottom()

    def _hideBottom(self) -> None:
        if self._bottomShown:
            self._write(b"\r\x1b[A\x1b[J")
            self._bottomShown = False

    def _showBottom(self) -> None:
        self._write(renderRow(self._statusRow()) + "\n")
        self._bottomShown = True
        self._drawInput()

    def _statusRow(self) -> Row:
        text = self.status
        if self._retryAt is not None:
            left = max(0, math.ceil(self._retryAt - self._clock.seconds()))
            text = _RETRYING.sub(f"retrying in {left} s", text)
        parts = ["wschat", text]
        # What may go, last first, when the row is too narrow for everything.
        optional = []
        if text == "connected":
            if self.online is not None:
                parts.append(f"{self.online} online")
            if self.you is not None:
                optional.append(f"you are {self.you}")
        optional.append("/help")
        while True:
            tokens = safeTokens(" " + " │ ".join(parts + optional) + " ", REVERSE)
            if not optional or sum(t.width for t in tokens) <= self.width:
                break
            optional.pop()
        row = fitTokens(tokens, self.width)
        pad = self.width - sum(t.width for t in row)
        return row + [Token(" " * pad, REVERSE, pad)] if pad > 0 else row

    def _drawStatus(self) -> None:
        if self._bottomShown:
            self._hideBottom()
            self._showBottom()

    def _drawInput(self) -> None:
        if not self._bottomShown:
            return
        room = max(self.width - textWidth(PROMPT) - 1, 1)
        self._scroll, visible, column = self.editor.window(self._scroll, room)
        offset = textWidth(PROMPT) + column
        forward = f"\x1b[{offset}C" if offset else ""
        self._write("\r\x1b[K" + renderRow(safeTokens(PROMPT, BOLD)) + visible + "\r" + forward)

    def repaint(self) -> None:
        """Clear the screen and draw the latest entries, then the bottom rows, at this size."""
        rows: list[Row] = []
        for entry in reversed(self._entries):
            rows[:0] = wrapTokens(entryTokens(entry), self.width)
            if len(rows) >= self.height - 2:
                break
        rows = rows[-(self.height - 2) :] if self.height > 2 else []
        self._write(b"\x1b[H\x1b[2J")
        for row in rows:
            self._write(renderRow(row) + "\n")
        self._showBottom()

    # -- the retry countdown

    def _tick(self) -> None:
        self._countdown = None
        if self._retryAt is None:
            return
        left = self._retryAt - self._clock.seconds()
        self._drawStatus()
        if left > 0:
            # Wake when the shown whole number of seconds changes.
            self._countdown = self._clock.callLater(left - math.floor(left) or 1.0, self._tick)

    def _stopCountdown(self) -> None:
        self._retryAt = None
        if self._countdown is not None and self._countdown.active():
            self._countdown.cancel()
        self._countdown = None

    def closeScreen(self) -> bytes:
        """
        What to write when leaving: the bottom rows erased, the last status as a plain line.
        """
        self._stopCountdown()
        self.closed = True
        erase = b"\r\x1b[A\x1b[J" if self._bottomShown else b"\r\x1b[J"
        self._bottomShown = False
        status = "".join(escapeChar(c) if isUnsafe(c) else c for c in self.status)
        return erase + b"\x1b[0m" + f"wschat: {status}\r\n".encode()


class Keyboard(ServerProtocol):
    """
    insults' terminal parser for a :class:`ChatTerminal`: tells it when a read has been handled
    (so a paste is drawn once), calls ``closed`` when standard input closes, and leaves the
    screen as it is (``ServerProtocol.loseConnection`` would reset the terminal, clearing it).
    """

    terminalProtocol: ChatTerminal

    def __init__(self, screen: ChatTerminal, closed: Callable[[Failure], None]) -> None:
        super().__init__(lambda: screen)
        self._closed = closed

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.terminalProtocol is not None:
            self.terminalProtocol.inputDone()

    def loseConnection(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self._closed(reason)


# -- from the room to the screen


class RoomReader:
    """
    Room payloads to :class:`ChatScreen` calls: JSON objects (``wschat.json``, see
    docs/protocol.md) when the server accepted that subprotocol, else plain text, where a
    ``<sender>: `` prefix names the sender and ``you`` is guessed from the local address.
    A JSON ``notice`` (a message of ours the room did not relay) goes to ``refused``.
    """

    _PREFIX = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3}:\d+|\[[0-9A-Fa-f:.]+\]:\d+|unix): ")

    def __init__(self, screen: ChatScreen, refused: Callable[[str], None] | None = None) -> None:
        self.screen = screen
        self._refused = refused
        self.json = False
        self.you: str | None = None

    def connected(self, json: bool, localAddress: str | None) -> None:
        self.json = json
        self.you = None if json else localAddress
        if not json:
            self.screen.showConnected(None, None)

    def received(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.screen.showMessage(None, f"<{len(payload)} bytes of binary data>", None, False)
        elif self.json:
            try:
                obj = json.loads(payload)
            except ValueError:
                obj = None
            self.receivedObject(obj, payload)
        else:
            self._plain(payload.decode("utf-8", "replace"))

    def _plain(self, text: str) -> None:
        match = self._PREFIX.match(text)
        if match is None:
            self.screen.showMessage(None, text, None, False)
        else:
            sender = match.group(1)
            self.screen.showMessage(sender, text[match.end() :], None, sender == self.you)

    def receivedObject(self, obj: Any, payload: bytes) -> None:
        """
        A JSON payload, already parsed into ``obj`` (None if it is not JSON): shown as plain
        text when it is not an object of a known shape.
        """
        try:
            kind = obj["type"]
            when = _parseTime(obj.get("time"))
            if kind == "message":
                sender = str(obj["from"])
                if "text" in obj:
                    text = str(obj["text"])
                else:
                    size = len(base64.b64decode(obj.get("data", ""), validate=True))
                    text = f"<{size} bytes of binary data>"
                self.screen.showMessage(sender, text, when, sender == self.you)
            elif kind == "welcome":
                self.you = str(obj["you"])
                self.screen.showConnected(self.you, int(obj["online"]))
                if obj.get("text"):
                    self.screen.showNotice(str(obj["text"]))
            elif kind in ("join", "leave"):
                self.screen.showPresence(kind, str(obj["who"]), int(obj["online"]), when)
            elif kind == "notice":
                if self._refused is not None:
                    self._refused(str(obj["text"]))
                else:
                    self.screen.showNotice(str(obj["text"]), important=True)
            # Other types are for newer clients.
        except (ValueError, KeyError, TypeError, binascii.Error):
            self.screen.showMessage(None, payload.decode("utf-8", "replace"), None, False)


def _parseTime(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        from datetime import datetime

        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# -- the glue to wschat.client


class TerminalSession(ChatSession):
    """
    The client's session with a :class:`ChatTerminal` as its output: room messages go through a
    :class:`RoomReader`, status to the status bar (while connected, as a line in the room; on
    standard error once the terminal is restored), and it is the terminal's
    :class:`ChatControl`.
    """

    def __init__(self, reactor: IReactorTime, maxPending: int = 1000, history: int = 0) -> None:
        super().__init__(reactor, stderrStatus, maxPending=maxPending, history=history)
        self.screen: ChatTerminal | None = None
        self.reader: RoomReader | None = None

    def attachScreen(self, screen: ChatTerminal) -> None:
        self.screen = screen
        self.reader = RoomReader(screen)

    def detachScreen(self) -> None:
        self.screen = None

    def _shown(self) -> ChatTerminal | None:
        return self.screen if self.screen is not None and not self.screen.closed else None

    # What the user sees (wschat.client.ChatSession's four methods; the session itself
    # counts a JSON notice as a line not delivered and shows it through status()).

    def showMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._shown() is not None and self.reader is not None:
            self.reader.received(payload, isBinary)

    def showObject(self, obj: dict[str, Any], payload: bytes) -> None:
        if self._shown() is not None and self.reader is not None:
            self.reader.receivedObject(obj, payload)

    def status(self, text: str) -> None:
        screen = self._shown()
        if screen is None:
            super().status(text)
        elif text.startswith("connected"):
            pass  # The welcome (or the connection, without JSON) says so in the status bar.
        elif self.connection is not None:
            screen.showNotice(text, important=True)
        else:
            screen.showStatus(text)

    # ChatControl

    def sendLine(self, text: str) -> None:
        if self.connection is None and self.screen is not None:
            self.screen.showNotice("not connected: the line goes out when the connection is back")
        self.send(text)

    def quit(self) -> None:
        d = self.close()
        d.addCallback(lambda _: None if self.done.called else self.finish(self.exitCode))

    # The connection

    def connected(self, connection: ChatClientProtocol) -> None:
        if self.reader is not None:
            host = connection.transport.getHost() if connection.transport else None
            json = connection.websocket_protocol_in_use == JSON_SUBPROTOCOL
            self.reader.connected(json, formatAddress(host) if host is not None else None)
        super().connected(connection)


class TerminalMode:
    """
    The terminal in raw mode for a :class:`TerminalSession`'s screen, and put back as it was.

    :meth:`restore` may be called any number of times; :func:`start` has it called when standard
    input closes and when the reactor shuts down (SIGINT, SIGTERM), and the client calls it when
    it returns, also on an error.
    """

    def __init__(self, reactor: Any, session: TerminalSession, stdin: int, stdout: int) -> None:
        assert session.screen is not None
        self.reactor = reactor
        self.session = session
        self.screen = session.screen
        self.stdin, self.stdout = stdin, stdout
        self.saved = termios.tcgetattr(stdin)
        self.restored = False
        self._oldWinch: Any = None

    def enter(self) -> None:
        tty.setraw(self.stdin, termios.TCSANOW)
        self._oldWinch = signal.signal(signal.SIGWINCH, self._winch)

    def _winch(self, signum: int, frame: object) -> None:
        # A signal handler may run between any two bytecodes: only schedule the redraw.
        self.reactor.callFromThread(self.resized)

    def resized(self) -> None:
        if not self.restored:
            self.screen.terminalSize(*terminalSize(self.stdout))

    def restore(self) -> None:
        if self.restored:
            return
        self.restored = True
        try:
            signal.signal(signal.SIGWINCH, self._oldWinch or signal.SIG_DFL)
            # StandardIO made them non-blocking; the shell after us shares them.
            fdesc.setBlocking(self.stdin)
            fdesc.setBlocking(self.stdout)
            _writeAll(self.stdout, self.screen.closeScreen())
        finally:
            try:
                termios.tcsetattr(self.stdin, termios.TCSADRAIN, self.saved)
            except termios.error:
                pass  # The terminal is gone (hung up): nothing left to restore.


def _writeAll(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data) :]
        except OSError:
            return


def terminalSize(fd: int) -> tuple[int, int]:
    """``(columns, rows)`` of the terminal on ``fd``; 80x24 when it does not say."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 80, 24
    return size.columns or 80, size.lines or 24


def start(
    reactor: Any, session: TerminalSession, colour: bool, stdin: int = 0, stdout: int = 1
) -> TerminalMode:
    """
    Run ``session`` on the terminal: raw mode, the keyboard read on the reactor, a redraw on
    SIGWINCH. The returned mode's ``restore()`` puts the terminal back.
    """
    screen = ChatTerminal(session, lambda: terminalSize(stdout), colour, reactor)
    session.attachScreen(screen)
    mode = TerminalMode(reactor, session, stdin, stdout)

    def closed(reason: Failure) -> None:
        mode.restore()
        if not reason.check(ConnectionDone, ConnectionLost):
            # The keyboard's handler failed: say how, now that the terminal is back.
            sys.stderr.write(f"wschat: the terminal failed:\n{reason.getTraceback()}")
            session.exitCode = 1
        session.outputClosed()

    keyboard = Keyboard(screen, closed)
    mode.enter()
    try:
        reactor.addSystemEventTrigger("before", "shutdown", mode.restore)
        # (mypy sees the Windows StandardIO, which takes no file descriptors.)
        stdio.StandardIO(keyboard, stdin=stdin, stdout=stdout, reactor=reactor)  # type: ignore[call-arg]
    except BaseException:
        mode.restore()
        raise
    # What the session stops (finish) and pauses (a full queue) is standard input.
    session.input = keyboard  # type: ignore[assignment]
    return mode


def wanted(options: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[bool, bool]:
    """
    ``(interactive, colour)`` for the client: interactive when standard input and output are a
    terminal that can move its cursor, unless ``--no-tty`` or ``--listen-only`` (nothing to
    type); colour unless ``--no-color``, ``NO_COLOR`` or a terminal without colours.
    """
    if options.get("no-tty") or options.get("listen-only"):
        return False, False
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return False, False
    interactive, colour = terminalCapabilities(environ)
    return interactive, colour and not options.get("no-color")


async def run(reactor: Any, options: Mapping[str, Any], colour: bool) -> None:
    """
    The client's interactive mode, as ``wschat.client.run`` is its line mode: the same
    connection and session, the ``wschat.json`` subprotocol offered so the room says who we are.
    """
    session = TerminalSession(
        reactor, maxPending=options["queue-size"], history=options.get("history", 0)
    )
    factory = ChatClientFactory(
        options["url"], session, reactor=reactor, protocols=[JSON_SUBPROTOCOL]
    )
    factory.maxRetries = options["max-retries"]
    mode = start(reactor, session, colour)
    try:
        reactor.addSystemEventTrigger("before", "shutdown", session.close)
        secure = options["secure"]
        contextFactory = tlsOptions(options["host"], options["ca-file"]) if secure else None
        connectWS(factory, contextFactory)
        await session.done
    finally:
        mode.restore()
    if session.exitCode:
        raise SystemExit(session.exitCode)
