"""
A TCP relay on 127.0.0.1 that a test can cut: the link between a browser and the daemon,
dropped for real (both sides reset at the TCP level) while the daemon goes on running.

One thread runs a select loop over every socket; the test's calls are carried out by that
thread, and return once they are done.
"""

from __future__ import annotations

import queue
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from typing import Literal

Direction = Literal["up", "down"]

#: How long a test's call waits for the relay's thread to carry it out.
TIMEOUT = 30.0


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset (RST), as a dropped link looks to its peers."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Done(threading.Event):
    """A call carried out by the relay's thread, and what it raised."""

    error: Exception | None = None


class Relay:
    """
    Connections to ``127.0.0.1:port`` (the relay's own port) are relayed to
    ``127.0.0.1:target``. :meth:`cut` resets every relayed connection and refuses new ones until
    :meth:`restore`; :meth:`swallow` drops the bytes going one way (``up``: from the client,
    ``down``: to it) without telling either side, as a link that is going away.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._wakeIn, self._wakeOut = socket.socketpair()
        self._calls: queue.Queue[tuple[Callable[[], None], _Done]] = queue.Queue()
        # Each relayed socket -> (its other end, the direction of bytes read from it).
        self._pairs: dict[socket.socket, tuple[socket.socket, Direction]] = {}
        self._refusing = False
        self._swallowed: set[Direction] = set()
        self._running = True
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wakeIn, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    # -- the test's side

    def _call(self, function: Callable[[], None]) -> None:
        done = _Done()
        self._calls.put((function, done))
        self._wakeOut.send(b"x")
        if not done.wait(TIMEOUT):
            raise TimeoutError("the relay's thread did not answer")
        if done.error is not None:
            raise done.error

    def cut(self) -> None:
        """Reset every relayed connection, both ends; refuse (reset) new ones."""

        def cut() -> None:
            self._refusing = True
            for sock in list(self._pairs):
                self._drop(sock)

        self._call(cut)

    def restore(self) -> None:
        """Relay new connections again, every byte both ways."""

        def restore() -> None:
            self._refusing = False
            self._swallowed.clear()

        self._call(restore)

    def swallow(self, direction: Direction) -> None:
        """Drop, from now on, the bytes going ``direction`` on every relayed connection."""
        self._call(lambda: self._swallowed.add(direction))

    @property
    def connections(self) -> int:
        """How many connections are being relayed."""
        count: list[int] = []
        self._call(lambda: count.append(len(self._pairs) // 2))
        return count[0]

    def close(self) -> None:
        def stop() -> None:
            self._running = False
            for sock in list(self._pairs):
                self._drop(sock)

        self._call(stop)
        self._thread.join(TIMEOUT)
        self._listener.close()
        self._wakeIn.close()
        self._wakeOut.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the relay's thread

    def _drop(self, sock: socket.socket) -> None:
        if sock not in self._pairs:
            return  # dropped with its other end
        other, _ = self._pairs.pop(sock)
        self._pairs.pop(other, None)
        for s in (sock, other):
            self._selector.unregister(s)
            _reset(s)

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        if self._refusing:
            _reset(client)
            return
        try:
            server = socket.create_connection(("127.0.0.1", self.target), timeout=TIMEOUT)
        except OSError:
            _reset(client)
            return
        server.settimeout(None)
        self._pairs[client] = (server, "up")
        self._pairs[server] = (client, "down")
        self._selector.register(client, selectors.EVENT_READ)
        self._selector.register(server, selectors.EVENT_READ)

    def _relay(self, sock: socket.socket) -> None:
        other, direction = self._pairs[sock]
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            # One side closed: close the other, as a relay would.
            self._pairs.pop(sock)
            self._pairs.pop(other)
            for s in (sock, other):
                self._selector.unregister(s)
            sock.close()
            try:
                other.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            other.close()
            return
        if direction in self._swallowed:
            return
        try:
            other.sendall(data)
        except OSError:
            self._drop(sock)

    def _loop(self) -> None:
        while self._running:
            for key, _ in self._selector.select():
                sock = key.fileobj
                if sock is self._wakeIn:
                    self._wakeIn.recv(4096)
                    while not self._calls.empty():
                        function, done = self._calls.get()
                        try:
                            function()
                        except Exception as e:
                            done.error = e
                        done.set()
                elif sock is self._listener:
                    self._accept()
                elif sock in self._pairs:
                    self._relay(sock)  # type: ignore[arg-type]
