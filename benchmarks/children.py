"""
Child processes for the benchmark drivers: for ``compare.py`` and ``redis_fanout.py``, a free
port to start one on, waiting until it listens, and stopping it; for ``slow_reader.py``, which
runs under the reactor, the test tree's ``twistd`` watcher and raw TCP client; for the asyncio
drivers (``flood.py``, ``fragments.py``), a raw WebSocket connection.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

# One implementation of each, shared with the tests (tests/childprocess.py, tests/rawws.py).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from childprocess import findExecutable, freePort, listeningPort, spawnTwistd  # noqa: E402
from rawws import RawClient, rawConnect  # noqa: E402

from wschat.bench.frames import handshakeRequest, handshakeResponse  # noqa: E402

__all__ = [
    "RawClient",
    "findExecutable",
    "freePort",
    "listeningPort",
    "openWebSocket",
    "processes",
    "quietTwistd",
    "rawConnect",
    "spawnTwistd",
    "stop",
    "waitListening",
]


async def openWebSocket(
    port: int, host: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """
    Connect to ``host``:``port`` and complete the opening handshake for ``/``; returns the
    streams and what the server sent after its response (the first frames).
    """
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(handshakeRequest(host, port, "/"))
    buf = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        done, buf = handshakeResponse(buf + chunk)
        if done:
            return reader, writer, buf


def quietTwistd(
    port: int, logdir: str, daemonArgs: Sequence[str] = (), twistdArgs: Sequence[str] = ()
) -> list[str]:
    """
    The command of ``twistd -n wschat`` on ``port``, logging to ``logdir``: no greeting, no log
    line per message or connection, no pings; then ``daemonArgs``.
    """
    return [
        findExecutable("twistd"),
        "-n",
        "--pidfile=",
        f"--logfile={logdir}/wschat.log",
        *twistdArgs,
        "wschat",
        "--port",
        str(port),
        "--welcome",
        "",
        "--no-message-log",
        "--no-connection-log",
        "--ping-interval",
        "0",
        *daemonArgs,
    ]


def waitListening(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Return once 127.0.0.1:``port`` accepts a connection; fail if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def stop(*started: subprocess.Popen[bytes]) -> None:
    """SIGTERM each; kill those still running 10 s later."""
    for process in started:
        if process.poll() is None:
            process.terminate()
    for process in started:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A list to add started processes to; all are stopped on the way out."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        stop(*started)
