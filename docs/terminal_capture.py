"""
Capture the interactive client in use: ``python -m wschat.client`` on a pseudo-terminal, read
by the pyte terminal emulator, while two line-mode clients talk in the room.

Run from anywhere after ``pip install '.[test]'`` (the PNG needs Debian's chromium, and
fonts-droid-fallback and fonts-noto-color-emoji for its CJK and emoji glyphs):

    python docs/terminal_capture.py

Writes docs/terminal.txt (the screen's text) and docs/terminal.png (the same screen, drawn
with its colours by headless Chromium).
"""

from __future__ import annotations

import fcntl
import html
import os
import select
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pyte
from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
# The daemon, client and Chromium helpers are the browser tests' own.
sys.path.insert(0, str(HERE.parent / "tests"))
from browser import TIMEOUT, ClientProcess, DaemonProcess, launchChromium  # noqa: E402

COLUMNS, LINES = 84, 14


class DimScreen(pyte.Screen):
    """
    A pyte screen that keeps "dim" (SGR 2, which pyte drops) as italics, which the client never
    uses, so that the picture shows what is dimmed.
    """

    def select_graphic_rendition(self, *attrs: int) -> None:
        super().select_graphic_rendition(*(3 if a == 2 else 23 if a == 22 else a for a in attrs))


class Pane:
    """The interactive client on a pty of COLUMNS x LINES, its output fed to a pyte screen."""

    def __init__(self, url: str, cwd: Path) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
        env = dict(os.environ, TERM="xterm-256color", LANG="C.UTF-8")
        env.pop("NO_COLOR", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wschat.client", "--url", url],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.screen = DimScreen(COLUMNS, LINES)
        self.stream = pyte.ByteStream(self.screen)

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def waitFor(self, condition: Callable[[str], bool], what: str) -> None:
        """Read the client's output until the screen's text satisfies ``condition``."""
        deadline = time.monotonic() + TIMEOUT
        while not condition(self.text()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the screen never showed {what}:\n{self.text()}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                self.stream.feed(os.read(self.master, 65536))

    def type(self, data: str) -> None:
        os.write(self.master, data.encode("utf-8"))

    def close(self) -> None:
        self.type("\x15\x04")  # Ctrl-U empties the line, Ctrl-D on it leaves
        self.waitFor(lambda text: "wschat: closed" in text, "the client leaving")
        self.process.wait(TIMEOUT)
        os.close(self.master)


def toHTML(screen: pyte.Screen) -> str:
    """The screen as an HTML page: one <pre>, each cell in its colours, the cursor shown."""
    palette = {
        "default": "#d8dee9",
        "black": "#3b4252",
        "red": "#e06c75",
        "green": "#98c379",
        "brown": "#e5c07b",
        "blue": "#61afef",
        "magenta": "#c678dd",
        "cyan": "#56b6c2",
        "white": "#e5e9f0",
        "brightred": "#ff7b86",
        "brightgreen": "#b5e890",
        "brightblue": "#82c4ff",
        "brightmagenta": "#e09cf5",
        "brightcyan": "#7fd6e0",
    }
    background = "#1e222a"
    rows = []
    for y in range(screen.lines):
        cells = []
        line = screen.buffer[y]
        x = 0
        while x < screen.columns:
            char = line[x]
            fg = palette.get(char.fg, palette["default"])
            if char.italics:
                fg = "#7b8394"
            bg = background
            if char.reverse:
                fg, bg = bg, fg
            if (x, y) == (screen.cursor.x, screen.cursor.y):
                fg, bg = background, palette["default"]
            weight = "bold" if char.bold else "normal"
            wide = x + 1 < screen.columns and line[x + 1].data == ""
            width = "2ch" if wide else "1ch"
            text = html.escape(char.data or " ")
            cells.append(
                f'<span style="color:{fg};background:{bg};font-weight:{weight};'
                f'display:inline-block;width:{width}">{text}</span>'
            )
            x += 2 if wide else 1
        rows.append("".join(cells))
    body = "\n".join(rows)
    return (
        "<!doctype html><meta charset=utf-8><style>"
        f"body{{margin:0;background:{background}}}"
        "pre{margin:0;padding:14px 16px;font:15px/1.35 'DejaVu Sans Mono',monospace;"
        f"background:{background};display:inline-block}}"
        "</style><pre id=screen>" + body + "</pre>"
    )


def main() -> None:
    cwd = Path(tempfile.mkdtemp())
    with DaemonProcess(cwd=cwd) as daemon:
        pane = Pane(daemon.url, cwd)
        pane.waitFor(lambda text: "connected │ 1 online" in text, "connected")
        bob = ClientProcess(daemon.url, cwd=cwd)
        pane.waitFor(lambda text: "joined · 2 online" in text, "bob joining")
        bob.send("Morning! Is the release build green?")
        pane.waitFor(lambda text: "release build green?" in text, "bob's line")
        pane.type("Yes, all tests pass. Tagging it now.\r")
        pane.waitFor(lambda text: "you: Yes, all tests pass" in text, "the own line")
        carol = ClientProcess(daemon.url, cwd=cwd)
        pane.waitFor(lambda text: "joined · 3 online" in text, "carol joining")
        carol.send("日本語も絵文字も 👍 列が揃います — wide characters keep the layout")
        pane.waitFor(lambda text: "wide characters keep" in text, "carol's line")
        bob.send("this line tries to clear your screen \x1b[2J and retitle it \x1b]0;pwned\x07")
        pane.waitFor(lambda text: "retitle it" in text, "the escaped line")
        carol.send(
            "and a long message wraps at the terminal's width, between words, so that nothing "
            "is cut and the input line below stays exactly as it was typed"
        )
        pane.waitFor(lambda text: "as it was typed" in text, "the long line")
        assert carol.close() == 0
        pane.waitFor(lambda text: "left · 2 online" in text, "carol leaving")
        pane.type("deploying from the terminal, back in")
        pane.waitFor(lambda text: "> deploying from the terminal, back in" in text, "typing")
        assert pane.screen.title == "", "a message retitled the terminal"

        (HERE / "terminal.txt").write_text(pane.text().rstrip() + "\n", encoding="utf-8")
        with sync_playwright() as playwright:
            browser = launchChromium(playwright)
            page = browser.new_page(device_scale_factor=2)
            page.set_content(toHTML(pane.screen))
            page.locator("#screen").screenshot(path=str(HERE / "terminal.png"))
            browser.close()
        pane.close()
        bob.close()
    print((HERE / "terminal.txt").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
