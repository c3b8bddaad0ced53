"""
A throwaway ``redis-server`` for tests of the Redis bus: a free loopback port, no persistence.

:class:`RedisServer` starts and stops the real binary under the reactor and knows it is ready
when it answers a connection; :func:`waitFor` waits for a condition on reactor turns.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable

from childprocess import ProcessWatcher, freePort, spawn
from rawws import RawClient, rawConnect
from twisted.internet import reactor, task
from twisted.internet.error import ConnectError


async def waitFor(
    condition: Callable[[], bool], timeout: float = 15.0, interval: float = 0.01
) -> None:
    """
    Wait, turning the reactor, until ``condition()`` holds; raise ``TimeoutError`` after
    ``timeout`` seconds.
    """
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise TimeoutError(f"{condition} still false after {timeout} s")
        await task.deferLater(reactor, interval, lambda: None)


class RedisServer:
    """
    One ``redis-server`` on 127.0.0.1: ``await server.start()``, ``await server.stop()``;
    it may be started again on the same port after a stop.

    A missing binary raises ``FileNotFoundError``: tests that need Redis fail, never skip.
    """

    def __init__(
        self, port: int | None = None, password: str | None = None, executable: str = "redis-server"
    ) -> None:
        self.port = port if port is not None else freePort()
        self.password = password
        self.executable = executable
        self._process: ProcessWatcher | None = None
        self._dir: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    async def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which(self.executable)
        if binary is None:
            raise FileNotFoundError(
                f"{self.executable} is not installed (Debian: apt-get install redis-server)"
            )
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="wschat-redis-")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", self._dir, "--daemonize", "no"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        output = spawn(args)
        self._process = output
        deadline = reactor.seconds() + timeout
        while True:
            if output.ended.called:
                raise RuntimeError(f"redis-server exited at start: {output.output!r}")
            try:
                # The first reply line: +PONG, or -NOAUTH when a password is set.
                ping = await rawConnect(f"redis://127.0.0.1:{self.port}", RawClient(b"PING\r\n"))
                reply = (await ping.until(lambda data: b"\r\n" in data)).split(b"\r\n", 1)[0]
                assert ping.transport is not None
                ping.transport.loseConnection()
            except (ConnectError, ConnectionError):
                if reactor.seconds() > deadline:
                    await self.stop()
                    raise TimeoutError(f"redis-server not ready after {timeout} s") from None
                await task.deferLater(reactor, 0.01, lambda: None)
                continue
            if reply.startswith((b"+PONG", b"-NOAUTH")):
                return
            raise RuntimeError(f"redis-server answered PING with {reply!r}")

    async def stop(self) -> None:
        """Stop the server (SIGTERM) and wait for it to exit."""
        process, self._process = self._process, None
        if process is None or process.ended.called:
            return
        process.signal("TERM")
        await process.ended

    def cleanup(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
