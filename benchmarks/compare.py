"""
Run the same scenarios on wschat and on its peers, alternating, and print the ratio table.

    python benchmarks/compare.py                       # everything, two repetitions
    python benchmarks/compare.py --servers wschat,node-ws --repeat 1 --duration 5
    python benchmarks/compare.py --before ../old/.venv/bin/twistd --servers wschat,wschat-before

``--before TWISTD`` adds the server ``wschat-before``: the same daemon and options as
``wschat``, run by another checkout's ``twistd`` (its own virtualenv, with that checkout
installed), to compare two versions of wschat side by side in one run.
``wschat`` reads every client as fast as it sends (``--inbound-rate 0 --inbound-bytes 0``),
as every peer does: with the daemon's default share (250 frames/s per client) the 10 senders
of the saturated scenario are read at 2,500 messages/s in all, a cap of 2.5M deliveries/s
that ``wschat-share`` (the default share) shows. ``wschat-before`` gets those two options when
its ``twistd wschat --help`` lists them. ``wschat-no-fast-write`` is ``wschat`` with
``--no-fast-write``.

Each run starts a fresh server pinned to one core (``taskset -c 0``) and a load generator
pinned to another (``taskset -c 1``). Scenarios, and what drives each:

- saturated: 1000 clients, 10 senders x 4 in flight (closed loop): deliveries/s. Driven by
  ``loadgen`` (``benchmarks/loadgen.c``, single-threaded C and epoll, built with ``gcc -O2``
  at the start of the run), so the figure is the server's and not the load tool's;
- idle: N connections held: server RSS per connection, handshakes/s; driven by ``loadgen``;
- moderate: 1000 clients, 20 messages/s in total (open loop): p50/p99 latency, server CPU;
  driven by ``python -m wschat.bench`` (at 20 msg/s it is far from busy);
- sweep (with --plot): latency against offered load, one line per server; ``wschat.bench``.

``--load python`` drives saturated and idle with ``python -m wschat.bench`` too. Both tools send
the same payloads and take the same scenario options. Around ``loadgen``'s measured window
(which it announces on stderr as it happens) this script reads the server's CPU time, its wait
for a CPU and its RSS from /proc, as ``wschat.bench --pid`` does for its own runs.

Needs: ``pip install '.[bench,plot]' websockets picows``, ``npm install`` in
``benchmarks/peers/node-ws``, and gcc (or ``--load python``). Every run is bounded in time; a
server that does not start or a load run that does not finish in time is recorded as failed,
never waited on forever.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from children import findExecutable, freePort, stop, waitListening

from wschat.bench.stats import (
    cpuShare,
    processCpuSeconds,
    processRssBytes,
    processWaitSeconds,
)

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
PY = sys.executable
TWISTD = findExecutable("twistd")


def wschatCommand(*extra: str, twistd: str = TWISTD) -> Callable[[int, str], list[str]]:
    """How to start ``twistd -n wschat`` with ``extra`` on a port, logging into a folder."""

    def command(port: int, logdir: str) -> list[str]:
        return [
            twistd,
            "-n",
            "--pidfile=",
            f"--logfile={logdir}/wschat-{port}.log",
            "wschat",
            "--port",
            str(port),
            "--welcome",
            "",
            # No keepalive pings: none of the peers sends any, and the counting clients of
            # the load tool do not answer them.
            "--ping-interval",
            "0",
            *extra,
        ]

    return command


def knownOptions(twistd: str, options: tuple[str, ...]) -> tuple[str, ...]:
    """``options`` (pairs of option and value) if ``twistd wschat --help`` lists them all."""
    usage = subprocess.run(
        [twistd, "wschat", "--help"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    return options if all(o in usage for o in options[::2]) else ()


def _script(path: Path, *extra: str) -> Callable[[int, str], list[str]]:
    return lambda port, logdir: [PY, str(path), "--port", str(port), *extra]


#: The options of the servers ``wschat-share`` and ``wschat-before``.
WSCHAT = ("--format", "raw", "--no-message-log")
#: Each client read as fast as it sends, as the peers do (the inbound share off).
NO_SHARE = ("--inbound-rate", "0", "--inbound-bytes", "0")

SERVERS: dict[str, Callable[[int, str], list[str]]] = {
    "wschat": wschatCommand(*WSCHAT, *NO_SHARE),
    # The default inbound share: 250 frames/s per client, which caps "saturated" at 2.5M/s.
    "wschat-share": wschatCommand(*WSCHAT),
    "wschat-no-fast-write": wschatCommand(*WSCHAT, *NO_SHARE, "--no-fast-write"),
    "wschat-prefixed": wschatCommand("--format", "prefixed", "--no-message-log"),
    "wschat-log": wschatCommand("--format", "raw"),
    "wschat-quiet": wschatCommand("--format", "raw", "--no-message-log", "--no-connection-log"),
    # History off: what keeping the recovery window (on by default) costs.
    "wschat-nohistory": wschatCommand("--format", "raw", "--no-message-log", "--history", "0"),
    "websockets": _script(PEERS / "websockets_server.py"),
    "node-ws": lambda port, logdir: ["node", str(PEERS / "node-ws" / "server.js"), str(port)],
    "picows": _script(PEERS / "picows_server.py"),
    "autobahn": _script(PEERS / "autobahn_server.py"),
    "autobahn-prepared": _script(PEERS / "autobahn_server.py", "--prepared"),
}
DEFAULT_SERVERS = [s for s in SERVERS if s != "wschat-no-fast-write"]

#: The scenarios ``--load c`` drives with loadgen; the others need wschat.bench's latency.
LOADGEN_SCENARIOS = ("saturated", "idle")

#: Above this share of its core, or of the measured time waiting for one, a figure is doubted.
BUSY = 0.9


def buildLoadgen(into: str) -> str:
    """Compile ``loadgen.c`` into the folder ``into`` with ``gcc -O2``; the executable's path."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit(
            "compare: gcc is needed to build the load generator benchmarks/loadgen.c "
            "(install gcc, or drive every scenario with --load python)"
        )
    binary = os.path.join(into, "loadgen")
    done = subprocess.run(
        [gcc, "-O2", "-Wall", "-Wextra", "-o", binary, str(HERE / "loadgen.c")],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"compare: gcc could not build loadgen.c:\n{done.stderr}")
    return binary


def _sample(pid: int) -> dict[str, Any]:
    return {
        "time": time.monotonic(),
        "cpu": processCpuSeconds(pid),
        "wait": processWaitSeconds(pid),
        "rss": processRssBytes(pid),
    }


def driveLoadgen(
    command: list[str], pid: int, timeout: float, quiet: bool = False
) -> dict[str, Any]:
    """
    Run loadgen (``command``) against the server process ``pid``; its JSON result, with the
    server's CPU share and wait (load) or RSS per connection (idle) over the window loadgen
    announces on stderr (``loadgen: window-start`` / ``window-end``), read when it says so.
    """
    before = _sample(pid)
    edges: dict[str, dict[str, Any]] = {}
    tool = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        tool.kill()

    watchdog = threading.Timer(timeout, expire)
    watchdog.start()
    try:
        assert tool.stderr is not None and tool.stdout is not None
        for raw in tool.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith("loadgen: window-"):
                edges[line.removeprefix("loadgen: window-")] = _sample(pid)
            elif not quiet:
                sys.stderr.write(line + "\n")
        out = tool.stdout.read()
        code = tool.wait()
    finally:
        watchdog.cancel()
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    if expired.is_set():
        raise subprocess.TimeoutExpired(command, timeout)
    if code != 0:
        raise RuntimeError(f"loadgen exited with status {code}")
    result: dict[str, Any] = json.loads(out)
    warnings: list[str] = result["warnings"]
    start, end = edges.get("start"), edges.get("end")
    if start is None or end is None:
        raise RuntimeError("loadgen did not announce its measured window")
    span = end["time"] - start["time"]
    if result["mode"] == "idle":
        if before["rss"] is not None and end["rss"] is not None and result["connected"]:
            result["server_rss_before"] = before["rss"]
            result["server_rss_open"] = start["rss"]
            result["server_rss_end"] = end["rss"]
            result["rss_per_connection"] = round(
                (end["rss"] - before["rss"]) / result["connected"], 1
            )
        return result
    if start["cpu"] is not None and end["cpu"] is not None:
        result["server_cpu"] = round(cpuShare(end["cpu"] - start["cpu"], span), 3)
    if start["wait"] is not None and end["wait"] is not None:
        result["server_cpu_wait"] = round(cpuShare(end["wait"] - start["wait"], span), 3)
        if result["server_cpu_wait"] > NOISY:
            warnings.append(
                f"the server waited for a CPU {result['server_cpu_wait']:.0%} of the time: the "
                "machine is busy with other work, so these figures are noisy"
            )
    if "server_cpu" in result and result["server_cpu"] + result.get("server_cpu_wait", 0) < BUSY:
        warnings.append(
            f"the server used only {result['server_cpu']:.0%} CPU: it was not saturated"
        )
    return result


def runBench(
    name: str,
    args: argparse.Namespace,
    logdir: str,
    benchArgs: list[str],
    timeout: float,
    loadgen: str | None = None,
) -> dict[str, Any]:
    """
    Start server ``name`` on core 0, run the load against it on core 1 (the ``loadgen``
    executable when given, else ``python -m wschat.bench``), stop the server.
    """
    port = freePort()
    command = SERVERS[name](port, logdir)
    out = open(Path(logdir) / f"{name}-{port}.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*args.priority, "taskset", "-c", args.server_cpu, *command],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=HERE,
        start_new_session=True,
    )
    try:
        waitListening(port, proc, 30)
        time.sleep(0.5)  # let the server finish starting before measuring its RSS
        url = f"{name}=ws://127.0.0.1:{port}/"
        if loadgen is not None:
            pinned = [*args.priority, "taskset", "-c", args.bench_cpu, loadgen]
            return driveLoadgen([*pinned, *benchArgs, "--url", url], proc.pid, timeout, args.quiet)
        bench = [
            *args.priority,
            "taskset",
            "-c",
            args.bench_cpu,
            PY,
            "-m",
            "wschat.bench",
            *benchArgs,
            "--url",
            url,
            "--pid",
            str(proc.pid),
            "--json",
        ]
        if args.quiet:
            bench.append("--quiet")
        done = subprocess.run(bench, stdout=subprocess.PIPE, timeout=timeout, check=False)
        if done.returncode != 0:
            return {"server": name, "error": f"bench exited with status {done.returncode}"}
        result: dict[str, Any] = json.loads(done.stdout)["runs"][0]
        return result
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        return {"server": name, "error": str(e)}
    finally:
        stop(proc)
        out.close()


def scenarios(args: argparse.Namespace) -> dict[str, list[str]]:
    common = ["--clients", str(args.clients), "--size", "64"]
    timing = ["--duration", str(args.duration), "--warmup", str(args.warmup)]
    return {
        "saturated": ["throughput", *common, "--senders", "10", "--inflight", "4", *timing],
        "moderate": ["rate", *common, "--senders", "10", "--rate", "20", *timing],
        "idle": ["idle", "--clients", str(args.idle_clients), "--duration", "3"],
    }


#: Above this share of the measured time spent waiting for a CPU, a figure is marked noisy.
NOISY = 0.1


def noisy(r: dict[str, Any]) -> bool:
    """Whether other work on the machine kept the server or the bench from a CPU."""
    return any((r.get(k) or 0) > NOISY for k in ("server_cpu_wait", "bench_cpu_wait"))


def fmt(v: float | None, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "rate":
        return f"{v / 1000:.0f}k" if v >= 10000 else f"{v:,.0f}"
    if kind == "ms":
        return f"{v:.1f}"
    if kind == "pct":
        return f"{v:.0%}"
    if kind == "kb":
        return f"{v / 1024:.1f} KiB"
    return str(v)


METRICS: list[tuple[str, str, Callable[[dict[str, Any]], float | None], str, bool]] = [
    # (label, scenario, getter, kind, higher is better)
    (
        "saturated: deliveries/s ({clients} clients, 10 senders x 4 in flight)",
        "saturated",
        lambda r: r.get("deliveries_per_s"),
        "rate",
        True,
    ),
    (
        "moderate: p50 latency ms ({clients} clients, 20 msg/s)",
        "moderate",
        lambda r: _lat(r, "p50"),
        "ms",
        False,
    ),
    ("moderate: p99 latency ms", "moderate", lambda r: _lat(r, "p99"), "ms", False),
    ("moderate: server CPU", "moderate", lambda r: r.get("server_cpu"), "pct", False),
    ("idle: server RSS per connection", "idle", lambda r: r.get("rss_per_connection"), "kb", False),
    ("handshakes/s", "idle", lambda r: r.get("handshakes_per_s"), "rate", True),
]


def _lat(r: dict[str, Any], p: str) -> float | None:
    lat = r.get("latency_ms")
    return None if lat is None else lat.get(p)


def table(
    results: dict[str, dict[str, list[dict[str, Any]]]], servers: list[str], clients: int
) -> str:
    """Markdown: each cell holds every repetition's figure, and wschat's ratio to it."""
    reference = "wschat"
    lines = [
        "| scenario | " + " | ".join(servers) + " |",
        "|---|" + "---|" * len(servers),
    ]
    for label, scenario, get, kind, _higher in METRICS:
        if scenario not in results[reference]:
            continue
        ours = [get(r) if "error" not in r else None for r in results[reference][scenario]]
        cells = []
        for name in servers:
            runs = results[name][scenario]
            values = [get(r) if "error" not in r else None for r in runs]
            cell = " / ".join(
                fmt(v, kind) + ("\\*" if noisy(r) else "")
                for v, r in zip(values, runs, strict=True)
            )
            if name != reference:
                ratios = [
                    f"{o / v:.2f}" if o is not None and v else "-"
                    for o, v in zip(ours, values, strict=False)
                ]
                cell += " (x" + " / ".join(ratios) + ")"
            cells.append(cell)
        lines.append(f"| {label.format(clients=clients)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Each cell: one figure per repetition (1 / 2 / ...); (xA / xB ...) is wschat's figure "
        f"over that server's in the same repetition. \\* marks a run where the server or the load "
        f"generator waited for a CPU more than {NOISY:.0%} of the time (other work on the machine)."
    )
    return "\n".join(lines)


def generators(results: dict[str, dict[str, list[dict[str, Any]]]], servers: list[str]) -> str:
    """Which tool drove each scenario, and the load generator's own CPU share under load."""
    lines = []
    for scenario, runs in results[servers[0]].items():
        tools = {r.get("tool", "wschat.bench") for r in runs if "error" not in r}
        if not tools:
            continue
        line = f"{scenario}: driven by {', '.join(sorted(tools))}"
        if scenario != "idle":
            shares = []
            for name in servers:
                got = [r.get("bench_cpu") for r in results[name][scenario] if "error" not in r]
                shares.append(f"{name} " + " / ".join(fmt(v, "pct") for v in got))
            line += "; its CPU share (of its core(s)): " + ", ".join(shares)
        lines.append(line)
    return "\n".join(lines)


def problems(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    found = []
    for name, byScenario in results.items():
        for scenario, runs in byScenario.items():
            for k, r in enumerate(runs, 1):
                if "error" in r:
                    found.append(f"{name} {scenario} #{k}: {r['error']}")
                    continue
                for w in r.get("warnings", []):
                    found.append(f"{name} {scenario} #{k}: {w}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=",".join(DEFAULT_SERVERS))
    parser.add_argument("--scenarios", default="saturated,moderate,idle")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--idle-clients", type=int, default=5000)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--bench-cpu", default="1")
    parser.add_argument("--plot", help="also sweep rates and draw latency against load (PNG)")
    parser.add_argument("--sweep", default="20,100,200,400,800", help="total msg/s for --plot")
    parser.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="run server and bench at this niceness (negative needs root; 0 to leave it)",
    )
    parser.add_argument("--sweep-servers", default="wschat,autobahn-prepared,node-ws,picows")
    parser.add_argument("--json", help="write every run's result here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines from the bench")
    parser.add_argument(
        "--load",
        choices=("c", "python"),
        default="c",
        help="what drives saturated and idle: c = benchmarks/loadgen.c (built with gcc), "
        "python = python -m wschat.bench (moderate and sweep always use wschat.bench)",
    )
    parser.add_argument(
        "--before",
        metavar="TWISTD",
        help="also know the server wschat-before: wschat run by this twistd "
        "(another checkout's virtualenv)",
    )
    args = parser.parse_args()

    if args.before:
        twistd = shutil.which(args.before)
        if twistd is None:
            parser.error(f"--before {args.before!r}: no such executable")
        twistd = os.path.abspath(twistd)
        SERVERS["wschat-before"] = wschatCommand(
            *WSCHAT, *knownOptions(twistd, NO_SHARE), twistd=twistd
        )
    servers = [s for s in args.servers.split(",") if s]
    unknown = [s for s in servers if s not in SERVERS]
    if unknown:
        parser.error(f"unknown servers {unknown}; known: {', '.join(SERVERS)}")
    if "wschat" not in servers:
        servers.insert(0, "wschat")
    if shutil.which("taskset") is None:
        parser.error("taskset (util-linux) is needed to pin server and load to cores")
    # Raised priority keeps other work on a shared machine from taking the measured cores.
    args.priority = []
    if args.nice and (args.nice > 0 or os.geteuid() == 0):
        args.priority = ["nice", "-n", str(args.nice)]
    elif args.nice:
        sys.stderr.write("compare: not root, so running at normal priority (--nice 0)\n")
    wanted = [s for s in args.scenarios.split(",") if s]
    all_ = scenarios(args)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {sc: [] for sc in wanted} for s in servers
    }
    runTimeout = args.duration + args.warmup + 180
    sweepResults: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wschat-compare-") as logdir:
        loadgen = buildLoadgen(logdir) if args.load == "c" else None
        for rep in range(args.repeat):
            for scenario in wanted:
                tool = loadgen if scenario in LOADGEN_SCENARIOS else None
                # Alternate: every server runs this scenario before any runs the next one.
                for name in servers:
                    sys.stderr.write(f"== repetition {rep + 1}: {scenario} on {name}\n")
                    r = runBench(name, args, logdir, all_[scenario], runTimeout, tool)
                    results[name][scenario].append(r)
                    if "error" in r:
                        sys.stderr.write(f"   FAILED: {r['error']}\n")
        if args.plot:
            timing = ["--duration", str(max(3.0, args.duration / 2)), "--warmup", "1"]
            for rate in args.sweep.split(","):
                for name in args.sweep_servers.split(","):
                    sys.stderr.write(f"== sweep: {rate} msg/s on {name}\n")
                    r = runBench(
                        name,
                        args,
                        logdir,
                        ["rate", "--clients", str(args.clients), "--rate", rate, *timing],
                        runTimeout,
                    )
                    if "error" not in r:
                        sweepResults.append(r)
                    else:
                        sys.stderr.write(f"   FAILED: {r['error']}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scenarios": results, "sweep": sweepResults}, f, indent=2)
    print(table(results, servers, args.clients))
    print()
    print(generators(results, servers))
    found = problems(results)
    if found:
        print("\nWarnings:")
        for p in found:
            print(f"- {p}")
    if args.plot:
        from wschat.bench.plot import plot

        plot(sweepResults, args.plot)
        print(f"\nchart: {args.plot}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
