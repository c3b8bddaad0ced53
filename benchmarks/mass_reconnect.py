"""
A mass reconnect: thousands of JSON clients dropped at once (TCP aborted) while the room keeps
talking, all reconnecting with ``since=EPOCH:SEQ``. Prints how long until every client has
recovered what it missed, and checks every client's log: no message lost, none duplicated.

    python benchmarks/mass_reconnect.py                   # 5000 clients, 20 msg/s, 1 s outage
    python benchmarks/mass_reconnect.py --clients 10000 --rate 50 --outage 2

The daemon is ``twistd -n wschat`` (history on, defaults) in a child process; the clients
(raw asyncio connections with the load tool's framer) and a talker run in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from children import freePort, quietTwistd, stop, waitListening

from wschat.bench.frames import OP_TEXT, RawWebSocket, clientFrame, openingHandshake

JSON_HEADER = "Sec-WebSocket-Protocol: wschat.json"
PRESENCE = (b'{"type":"join"', b'{"type":"leave"')


def rssKiB(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Client(RawWebSocket):
    """One JSON client: its log of seqs across connections, and when it recovered."""

    def __init__(self, run: Run, query: str) -> None:
        super().__init__(run.host, "/" + (f"?{query}" if query else ""), [JSON_HEADER])
        self.run = run
        self.ready = asyncio.get_running_loop().create_future()

    def frameReceived(self, opcode: int, payload: bytes) -> None:
        # Presence events (every join and leave of the storm) are not what is measured.
        if opcode == OP_TEXT and not payload.startswith(PRESENCE):
            self.run.onObject(self, json.loads(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"lost before the welcome: {exc}"))


class State:
    """What one logical client (across its two connections) saw."""

    __slots__ = ("seqs", "last", "welcomes", "target", "recoveredAt", "ended", "proto", "atDrop")

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.last = ""
        self.welcomes: list[dict[str, object]] = []
        self.target = 0
        self.recoveredAt: float | None = None
        self.ended = False
        self.proto: Client | None = None
        self.atDrop = 0


class Run:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.states: dict[Client, State] = {}
        self.recovering = 0
        self.allRecovered: asyncio.Future[None] | None = None
        self.ending = 0
        self.allEnded: asyncio.Future[None] | None = None
        self.endText = "end"

    def onObject(self, client: Client, obj: dict[str, object]) -> None:
        state = self.states[client]
        kind = obj["type"]
        if kind == "message":
            seq = obj["seq"]
            assert isinstance(seq, int)
            state.seqs.append(seq)
            state.last = f"{obj['epoch']}:{seq}"
            if state.recoveredAt is None and state.welcomes and seq >= state.target:
                self._recovered(state)
            if obj["text"] == self.endText and not state.ended:
                state.ended = True
                self.ending -= 1
                if self.ending == 0 and self.allEnded is not None:
                    self.allEnded.set_result(None)
        elif kind == "welcome":
            state.welcomes.append(obj)
            if not state.last:
                state.last = f"{obj['epoch']}:{obj['seq']}"
            target = obj["seq"]
            assert isinstance(target, int)
            state.target = target
            if not client.ready.done():
                client.ready.set_result(None)
            if len(state.welcomes) > 1 and (not state.seqs or state.seqs[-1] >= target):
                self._recovered(state)

    def _recovered(self, state: State) -> None:
        if len(state.welcomes) < 2:
            return
        state.recoveredAt = time.monotonic()
        self.recovering -= 1
        if self.recovering == 0 and self.allRecovered is not None:
            self.allRecovered.set_result(None)

    async def connect(self, state: State, query: str, gate: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        async with gate:
            client = Client(self, query)
            self.states[client] = state
            state.proto = client
            await loop.create_connection(lambda: client, "127.0.0.1", self.port)
            await client.ready


class Talker(asyncio.Protocol):
    """A plain client that says a line every 1/rate seconds and discards what it receives."""

    def __init__(self, host: str, rate: float) -> None:
        self.host = host
        self.interval = 1.0 / rate
        self.count = 0
        self.handle: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(openingHandshake(self.host, "/"))

    def data_received(self, data: bytes) -> None:
        pass

    def start(self) -> None:
        self.tick()

    def tick(self) -> None:
        self.say(f"t{self.count}")
        self.count += 1
        self.handle = asyncio.get_running_loop().call_later(self.interval, self.tick)

    def say(self, text: str) -> None:
        assert self.transport is not None
        self.transport.write(clientFrame(text.encode()))

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


async def bench(args: argparse.Namespace, port: int, pid: int) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    host = f"127.0.0.1:{port}"
    run = Run(host, port)
    gate = asyncio.Semaphore(args.concurrency)
    states = [State() for _ in range(args.clients)]
    t = time.monotonic()
    await asyncio.gather(*(run.connect(s, "", gate) for s in states))
    connectTime = time.monotonic() - t
    rssConnected = rssKiB(pid)
    _, talker = await loop.create_connection(lambda: Talker(host, args.rate), "127.0.0.1", port)
    talker.start()
    await asyncio.sleep(args.before)
    # Everyone drops at once, at the TCP level, while the talker keeps talking.
    run.recovering = len(states)
    run.allRecovered = loop.create_future()
    dropped = time.monotonic()
    for s in states:
        assert s.proto is not None and s.proto.transport is not None
        s.proto.transport.abort()
        s.atDrop = int(s.last.rpartition(":")[2])
    await asyncio.sleep(args.outage)
    reconnecting = time.monotonic()
    await asyncio.gather(*(run.connect(s, f"since={s.last}", gate) for s in states))
    await asyncio.wait_for(run.allRecovered, args.timeout)
    recoveredAll = time.monotonic()
    rssRecovered = rssKiB(pid)
    await asyncio.sleep(args.after)
    talker.stop()
    run.ending = len(states)
    run.allEnded = loop.create_future()
    talker.say(run.endText)
    await asyncio.wait_for(run.allEnded, args.timeout)
    # Every log must be one contiguous run of seqs up to the end marker, without a repeat; a
    # client told it did not recover (recovered: false, the outage outlasted the window) may
    # have one hole, where it was told, and none after.
    lost = duplicated = notRecovered = 0
    for s in states:
        seqs = s.seqs
        duplicated += len(seqs) - len(set(seqs))
        told = any(w.get("recovered") is not True for w in s.welcomes[1:])
        notRecovered += told
        first = int(str(s.welcomes[0]["seq"])) + 1
        if told:
            # Count holes only after the replay the daemon chose to send.
            cut = next((i for i, q in enumerate(seqs) if q > s.atDrop), len(seqs))
            seqs = seqs[:cut] if cut == len(seqs) else seqs[cut:]
            first = seqs[0] if seqs else first
        if seqs:
            lost += (seqs[-1] - first + 1) - len(set(seqs))
            if seqs != sorted(set(seqs)):
                lost += 1  # out of order counts as a fault too
    missed = [int(str(s.welcomes[1]["seq"])) - s.atDrop for s in states]
    perClient = sorted(
        (s.recoveredAt or recoveredAll) - reconnecting for s in states if s.recoveredAt
    )
    return {
        "clients": args.clients,
        "rate": args.rate,
        "outage_s": args.outage,
        "connect_s": connectTime,
        "room_messages": talker.count + 1,
        "recover_from_drop_s": recoveredAll - dropped,
        "recover_from_reconnect_s": recoveredAll - reconnecting,
        "recover_p50_s": perClient[len(perClient) // 2],
        "recover_max_s": perClient[-1],
        "lost": lost,
        "duplicated": duplicated,
        "not_recovered": notRecovered,
        "total_messages": sum(len(s.seqs) for s in states),
        "rss_connected_mib": rssConnected / 1024,
        "rss_recovered_mib": rssRecovered / 1024,
        "_missed": missed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=20.0, help="room messages per second")
    parser.add_argument("--before", type=float, default=1.0, help="seconds of talk before")
    parser.add_argument("--outage", type=float, default=1.0, help="seconds everyone is away")
    parser.add_argument("--after", type=float, default=1.0, help="seconds of talk after")
    parser.add_argument("--concurrency", type=int, default=500, help="handshakes in flight")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--daemon-args", default="", help="extra twistd wschat options")
    parser.add_argument(
        "--twistd-args", default="", help="extra twistd options (--profile=FILE --savestats)"
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # This process holds one socket per client (the daemon, a child, raises its own limit).
    want = max(soft, min(hard, args.clients + 1000))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < args.clients + 100:
        parser.error(f"open files limit {want} is too low for {args.clients} clients")
    port = freePort()
    with tempfile.TemporaryDirectory(prefix="wschat-reconnect-") as logdir:
        command = quietTwistd(
            port, logdir, args.daemon_args.split(), twistdArgs=args.twistd_args.split()
        )
        proc = subprocess.Popen(command, start_new_session=True)
        try:
            waitListening(port, proc, 30)
            r = asyncio.run(bench(args, port, proc.pid))
        finally:
            stop(proc)
    missed = r.pop("_missed")
    assert isinstance(missed, list)
    print(f"mass reconnect: {r['clients']} JSON clients, room talking at {r['rate']:g} msg/s")
    print(f"  connect all (first time)          {r['connect_s']:.2f} s")
    print(f"  all dropped at once (TCP abort), away {r['outage_s']:g} s, back with since=")
    print(f"  missed per client                 {min(missed)}-{max(missed)} messages")
    print(f"  all recovered, from the drop      {r['recover_from_drop_s']:.2f} s")
    print(f"  all recovered, from reconnecting  {r['recover_from_reconnect_s']:.2f} s")
    print(
        f"  per client from reconnecting      p50 {r['recover_p50_s']:.2f} s, "
        f"max {r['recover_max_s']:.2f} s"
    )
    print(f"  messages received in all          {r['total_messages']}")
    print(f"  lost (a hole nobody was told of)  {r['lost']}")
    print(f"  duplicated                        {r['duplicated']}")
    print(f"  told recovered: false (outage longer than the window)  {r['not_recovered']}")
    print(
        f"  daemon RSS                        {r['rss_connected_mib']:.0f} MiB connected, "
        f"{r['rss_recovered_mib']:.0f} MiB after the reconnect"
    )
    if r["lost"] or r["duplicated"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
