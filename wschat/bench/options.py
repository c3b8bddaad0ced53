"""
The load tool's command line: modes, options and their checks, and the ``[NAME=]ws://`` server
argument.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from twisted.python import usage

from wschat.bench.frames import minimumSize

MODES = ("throughput", "rate", "idle")


def _floatList(value: str) -> list[float]:
    try:
        rates = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{value!r} is not a comma-separated list of numbers") from None
    if not rates or any(r <= 0 for r in rates):
        raise ValueError("rates must be positive numbers")
    return rates


class Options(usage.Options):
    synopsis = "MODE [options]   (MODE: throughput | rate | idle)"
    longdesc = (
        "Load a relay-to-all WebSocket server (every message goes to every client) and "
        "report deliveries/s, latency percentiles, loss and reordering. 'throughput': each "
        "sender keeps --inflight messages in flight, each acknowledged by its own echo. "
        "'rate': senders send --rate messages/s in total on a fixed schedule; latency counts "
        "from the scheduled time. 'idle': open --clients connections, report handshakes/s "
        "and (with --pid) the server's RSS per connection, and hold them for --duration."
    )
    optParameters: list[list[Any]] = [
        [
            "url",
            "u",
            None,
            "Server URL, optionally NAME=URL; repeatable (one run per server, or one run "
            "over all of them with --spread).",
        ],
        ["clients", "c", 1000, "Connections to open.", int],
        ["senders", "s", 10, "How many of the clients send.", int],
        ["inflight", "w", 4, "throughput: messages each sender keeps in flight.", int],
        ["rate", "r", None, "rate: messages/s in total; a comma-separated list sweeps.", None],
        ["size", None, 64, "Payload bytes per message.", int],
        ["duration", "d", 10.0, "Seconds measured (idle: seconds held).", float],
        ["warmup", None, 2.0, "Seconds of load before measuring.", float],
        ["drain", None, 10.0, "Seconds to wait, after sending stops, for deliveries.", float],
        ["processes", "j", None, "Worker processes (default: one per usable core).", int],
        ["concurrency", None, 200, "Handshakes in progress at once, per process.", int],
        ["connect-timeout", None, 30.0, "Seconds allowed for one connection to open.", float],
        [
            "verify",
            None,
            "100",
            "Clients that read every frame and check order and latency, besides the senders: "
            "a number or 'all'. The others only count messages (loss stays exact for all).",
            None,
        ],
        ["pid", None, None, "Server process id: report its CPU and RSS.", int],
        ["plot", None, None, "Write a PNG of latency against offered load (rate sweeps)."],
        ["run-id", None, None, "Marker run id 0-65535 (default: random).", int],
    ]
    optFlags: list[list[str | None]] = [
        ["json", None, "Print the results as JSON on stdout."],
        ["quiet", "q", "No progress line."],
        [
            "spread",
            None,
            "The --urls are daemons of ONE room (say, sharing a Redis): one run spreads the "
            "clients, senders among them, round-robin over them; every client must receive "
            "every message.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["urls"] = []

    def opt_url(self, value: str) -> None:
        self["urls"].append(value)

    opt_u = opt_url

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # The mode comes first (``throughput --clients 10``), and getopt stops at the
        # first word that is not an option: take the mode off before it looks.
        args = list(sys.argv[1:] if options is None else options)
        if args and not args[0].startswith("-"):
            self["mode"] = args.pop(0)
        super().parseOptions(args)

    def parseArgs(self, *extra: str) -> None:
        if extra:
            raise usage.UsageError(f"unexpected arguments: {' '.join(extra)}")
        mode = self.get("mode")
        if mode is None:
            raise usage.UsageError(f"give a mode first: {', '.join(MODES)}")
        if mode not in MODES:
            raise usage.UsageError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")

    def postOptions(self) -> None:
        if not self["urls"]:
            self["urls"] = ["ws://127.0.0.1:2000/"]
        self["servers"] = [parseServer(u) for u in self["urls"]]
        if self["spread"]:
            if len(self["servers"]) < 2:
                raise usage.UsageError("--spread needs two or more --url (daemons of one room)")
            self["groups"] = [self["servers"]]
        else:
            self["groups"] = [[server] for server in self["servers"]]
        for name in ("clients", "concurrency"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be 1 or more")
        if not 0 <= self["senders"] <= self["clients"]:
            raise usage.UsageError("--senders must be between 0 and --clients")
        if self["inflight"] < 1:
            raise usage.UsageError("--inflight must be 1 or more")
        if self["duration"] <= 0 or self["warmup"] < 0 or self["drain"] < 0:
            raise usage.UsageError("--duration must be positive, --warmup and --drain not negative")
        if self["processes"] is not None and self["processes"] < 1:
            raise usage.UsageError("--processes must be 1 or more")
        if self["run-id"] is None:
            self["run-id"] = int.from_bytes(os.urandom(2), "big")
        elif not 0 <= self["run-id"] <= 0xFFFF:
            raise usage.UsageError("--run-id must be in 0-65535")
        if self["size"] < minimumSize(self["run-id"]):
            raise usage.UsageError(f"--size must be at least {minimumSize(self['run-id'])}")
        if self["verify"] == "all":
            self["verify"] = None
        else:
            try:
                self["verify"] = int(self["verify"])
                if self["verify"] < 0:
                    raise ValueError
            except ValueError:
                raise usage.UsageError("--verify must be 'all' or a number of clients") from None
        mode = self["mode"]
        if mode == "rate":
            if self["rate"] is None:
                raise usage.UsageError("rate mode needs --rate (messages/s in total)")
            try:
                self["rates"] = _floatList(self["rate"])
            except ValueError as e:
                raise usage.UsageError(f"--rate: {e}") from None
        else:
            if self["rate"] is not None:
                raise usage.UsageError("--rate is for rate mode")
            self["rates"] = [None]
        if mode in ("throughput", "rate") and self["senders"] < 1:
            raise usage.UsageError(f"{mode} mode needs at least one sender")
        if self["plot"] is not None and mode != "rate":
            raise usage.UsageError("--plot draws a rate sweep: use it with rate mode")


def parseServer(value: str) -> tuple[str, str, int, str]:
    """``[NAME=]ws://host:port/path`` as (name, host, port, path)."""
    name, sep, url = value.partition("=")
    if not sep or "://" in name:
        name, url = "", value
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise usage.UsageError(f"{url!r}: only ws:// URLs are supported (no TLS)")
    if not parts.hostname:
        raise usage.UsageError(f"{url!r} has no host")
    try:
        port = parts.port or 80
    except ValueError as e:
        raise usage.UsageError(f"{url!r}: {e}") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return name or url, parts.hostname, port, path
