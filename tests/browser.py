"""
The daemon and the command-line client as real child processes, and headless Chromium, for
tests that drive a browser (Playwright's sync API cannot share a thread with the reactor) and
for the script that takes the README's screenshot.

Waiting is always for an event (a log line, an output line, a process exit) with a deadline,
never a sleep.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from childprocess import LISTENING, findExecutable

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

#: Debian's Chromium. Playwright's own browser download does not work on these machines.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: How long a child process gets to say what is expected of it.
TIMEOUT = 30.0

_LISTENING = re.compile(LISTENING)


def launchChromium(playwright: Playwright) -> Browser:
    """
    Launch Debian's headless Chromium; fail, naming the package, if it is not installed.
    """
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} not found: apt-get install chromium (see .ci/apt-packages)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


class _Lines:
    """Lines read from a child's pipe by a thread, waited for with a deadline."""

    def __init__(self, pipe: IO[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next(self, timeout: float = TIMEOUT) -> str:
        """The next line; raises if the pipe closes or nothing comes within ``timeout``."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line within {timeout} s; so far: {self.seen}") from None
        if line is None:
            self._queue.put(None)
            raise EOFError(f"the process closed its output; it said: {self.seen}")
        self.seen.append(line)
        return line

    def waitFor(self, pattern: str | re.Pattern[str], timeout: float = TIMEOUT) -> re.Match[str]:
        """Skip lines until one matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.next(max(0.0, deadline - time.monotonic()))
            match = re.search(pattern, line)
            if match is not None:
                return match


class DaemonProcess:
    """
    ``twistd -n wschat --port PORT ARGS`` on 127.0.0.1, run in ``cwd``. ``port`` 0 picks a free
    port; :meth:`restart` comes back on the same one.
    """

    def __init__(self, args: Sequence[str] = (), port: int = 0, cwd: Path | None = None) -> None:
        self.args = list(args)
        self.port = port
        self.cwd = cwd if cwd is not None else Path(tempfile.gettempdir())
        self.process: subprocess.Popen[str] | None = None
        self.log: _Lines | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def httpURL(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        command = [findExecutable("twistd"), "-n", "--pidfile=", "--logfile=-", "wschat"]
        command += ["--port", str(self.port), *self.args]
        self.process = subprocess.Popen(
            command,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.log = _Lines(self.process.stdout)  # type: ignore[arg-type]
        self.port = int(self.log.waitFor(_LISTENING).group(1))

    def stop(self) -> int:
        """SIGTERM, as an init system stops it; returns the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(TIMEOUT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def get(self, path: str) -> bytes:
        """The body of ``GET path`` on the daemon's port."""
        with urllib.request.urlopen(self.httpURL + path.lstrip("/"), timeout=TIMEOUT) as r:
            body: bytes = r.read()
            return body

    def __enter__(self) -> DaemonProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()


class ClientProcess:
    """
    ``python -m wschat.client --url URL ARGS``: lines in on stdin, the room's lines on stdout.
    """

    def __init__(self, url: str, cwd: Path | None = None, args: Sequence[str] = ()) -> None:
        # cwd matters: ``python -m`` puts it first on sys.path, where a checkout would shadow
        # the installed package.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wschat.client", "--url", url, *args],
            cwd=cwd if cwd is not None else tempfile.gettempdir(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.output = _Lines(self.process.stdout)  # type: ignore[arg-type]
        self.status = _Lines(self.process.stderr)  # type: ignore[arg-type]

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def close(self) -> int:
        """End standard input: the client closes its connection and exits."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.process.wait(TIMEOUT)

    def said(self) -> list[str]:
        """Every status line the client wrote, once it has exited (for a failure's message)."""
        try:
            while True:
                self.status.next()
        except (EOFError, TimeoutError):
            return self.status.seen

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)
