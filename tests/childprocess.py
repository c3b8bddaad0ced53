"""
Real child processes (``twistd``, the client, ``redis-server``) under the reactor, whose output a
test waits on line by line, without sleeping.

- :func:`spawn` runs a command; :class:`ProcessWatcher` is what it returns.
- :func:`spawnTwistd` runs ``twistd -n wschat``; :func:`listeningPort` finds the port it took.
- :func:`freePort` names a port for a server started later.
- :func:`exited` waits for a process that is not our child (a daemonized ``twistd``) to exit.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from collections.abc import Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import implementer


class ProcessWatcher(ProcessProtocol):
    """
    A child process whose output tests wait on, line by line, without sleeping.

    ``waitFor(pattern, stream)`` fires with the first line (past or future) matching the
    regular expression; ``ended`` fires with the exit code.
    """

    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self._partial = {"out": b"", "err": b""}
        self._waiters: list[tuple[re.Pattern[str], str, int, defer.Deferred[re.Match[str]]]] = []
        #: Fires with the exit code (None when a signal ended the process).
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        #: Why it ended: ProcessDone, or ProcessTerminated with its exitCode and signal.
        self.endReason: BaseException | None = None

    @property
    def output(self) -> str:
        """Everything it wrote so far, standard output then standard error."""
        return "\n".join(self.lines["out"] + self.lines["err"])

    def outReceived(self, data: bytes) -> None:
        self._received("out", data)

    def errReceived(self, data: bytes) -> None:
        self._received("err", data)

    def _received(self, stream: str, data: bytes) -> None:
        *complete, self._partial[stream] = (self._partial[stream] + data).split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines[stream].append(line)
            for waiter in list(self._waiters):
                pattern, wanted, remaining, d = waiter
                match = pattern.search(line)
                if wanted == stream and match:
                    self._waiters.remove(waiter)
                    if remaining > 1:
                        self._waiters.append((pattern, wanted, remaining - 1, d))
                    else:
                        d.callback(match)

    def waitFor(
        self, pattern: str, stream: str = "out", count: int = 1
    ) -> defer.Deferred[re.Match[str]]:
        """Fire with the ``count``-th line of ``stream`` that matches ``pattern``."""
        compiled = re.compile(pattern)
        for line in self.lines[stream]:
            match = compiled.search(line)
            if match:
                count -= 1
                if count == 0:
                    return defer.succeed(match)
        d: defer.Deferred[re.Match[str]] = defer.Deferred()
        if self.ended.called:
            d.errback(AssertionError(f"process ended before printing {pattern!r}"))
        else:
            self._waiters.append((compiled, stream, count, d))
        return d

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def closeStdin(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()

    def signal(self, name: str) -> None:
        """Send the signal ``name`` (``TERM``, ``INT``, ``KILL``) unless it has exited."""
        if not self.ended.called and self.transport is not None:
            self.transport.signalProcess(name)

    async def kill(self) -> None:
        """Make sure it is gone (test clean-up)."""
        self.signal("KILL")
        await self.ended

    def processEnded(self, reason: Failure) -> None:
        for stream, rest in self._partial.items():
            if rest:
                self._received(stream, b"\n")
        waiters, self._waiters = self._waiters, []
        for pattern, _, _, d in waiters:
            d.errback(AssertionError(f"process ended before printing {pattern.pattern!r}"))
        self.endReason = reason.value
        self.ended.callback(getattr(reason.value, "exitCode", None))


def spawn(
    args: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None
) -> ProcessWatcher:
    """
    Run ``args`` (``args[0]`` found on the venv's or the system's PATH) with piped stdio.
    """
    from twisted.internet import reactor

    executable = findExecutable(args[0])
    watcher = ProcessWatcher()
    environment = dict(os.environ if env is None else env)
    environment.setdefault("PYTHONUNBUFFERED", "1")
    reactor.spawnProcess(  # type: ignore[attr-defined]
        watcher, executable, list(args), env=environment, path=cwd
    )
    return watcher


def findExecutable(name: str) -> str:
    """
    The program ``name`` beside this Python (its venv's ``twistd``, say), else on PATH; else
    ``name`` itself, for the process launcher to report as missing.
    """
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return shutil.which(name, path=path) or name


def freePort(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on at this moment (for a server started later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@implementer(IReadDescriptor)
class _ExitWatch:
    """A Linux pidfd, readable once its process has exited."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.gone: defer.Deferred[None] = defer.Deferred()

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "pidfd"

    def doRead(self) -> None:
        from twisted.internet import reactor

        reactor.removeReader(self)  # type: ignore[attr-defined]
        self.connectionLost(None)

    def connectionLost(self, reason: object) -> None:
        if not self.gone.called:
            os.close(self.fd)
            self.gone.callback(None)


def exited(pid: int) -> defer.Deferred[None]:
    """
    Fires once the process ``pid`` has exited (at once if there is none): for a process that
    is not our child, such as the daemon a ``twistd`` without ``-n`` forks off.
    """
    from twisted.internet import reactor

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return defer.succeed(None)
    watch = _ExitWatch(fd)
    reactor.addReader(watch)  # type: ignore[attr-defined]
    return watch.gone


#: What ``twistd -n wschat`` logs once it listens; group 1 is the port.
LISTENING = r"wschat listening on IPv[46]Address\(.*?port=(\d+)\)"


def spawnTwistd(args: Sequence[str], cwd: str) -> ProcessWatcher:
    """
    Start ``twistd -n --pidfile= wschat ARGS`` (the twistd installed next to this Python) in
    the folder ``cwd``; ``await listeningPort(child)`` for its port.
    """
    return spawn(["twistd", "-n", "--pidfile=", "wschat", *args], cwd=cwd)


async def listeningPort(child: ProcessWatcher) -> int:
    """The first TCP port a ``twistd wschat`` child says it listens on."""
    return int((await child.waitFor(LISTENING)).group(1))
