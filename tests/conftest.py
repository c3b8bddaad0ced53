"""Shared fixtures: a running daemon on a free loopback port, torn down after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
from childprocess import ProcessWatcher, spawn
from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher

from wschat.server import ChatServer
from wschat.testing import startDaemon


@pytest_twisted.async_yield_fixture
async def daemon() -> AsyncIterator[Callable[..., tuple[ChatServer, str]]]:
    """Start daemons with ``daemon(*args)``; each is stopped when the test ends."""
    started: list[ChatServer] = []

    def start(*args: str) -> tuple[ChatServer, str]:
        service, url = startDaemon(args)
        started.append(service)
        return service, url

    yield start
    for service in started:
        await defer.maybeDeferred(service.stopService)


@pytest.fixture
def processes(tmp_path):
    """
    Spawn commands with ``processes(*argv)`` in a scratch folder (so the installed package, not
    the checkout, is imported); any still running are killed after the test.
    """
    running: list[ProcessWatcher] = []

    def start(*args: str) -> ProcessWatcher:
        watcher = spawn(args, cwd=str(tmp_path))
        running.append(watcher)
        return watcher

    yield start
    for watcher in running:
        if not watcher.ended.called:
            pytest_twisted.blockon(defer.ensureDeferred(watcher.kill()))


@pytest.fixture
def logged():
    """Every log event emitted during the test, as formatted text."""
    events: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        events.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)
