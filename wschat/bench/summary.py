"""
Summing up the workers' reports of one run: deliveries/s, latency, loss and CPU shares, with
warnings where the figures are doubtful.
"""

from __future__ import annotations

from typing import Any

from wschat.bench.options import Options
from wschat.bench.stats import cpuShare, latencySummary, merge, usableCores

#: Above this share of its cores the load tool says it may be the bottleneck.
BUSY = 0.9


def summarise(
    options: Options,
    rate: float | None,
    replies: list[dict[str, Any]],
    totalSent: int,
    serverCpu: dict[str, float | None],
    result: dict[str, Any],
    warnings: list[str],
) -> dict[str, Any]:
    """
    Sum up the workers' reports of one load run into ``result`` (the figures, and ``warnings``
    about anything that makes them doubtful).
    """
    starts = [r["window"]["start"] for r in replies]
    ends = [r["window"]["end"] for r in replies]
    if not all(starts) or not all(ends):
        raise RuntimeError("a worker did not record the measured window")
    wall = sum(e["time"] - s["time"] for s, e in zip(starts, ends, strict=True)) / len(replies)
    sent = sum(e["sent"] - s["sent"] for s, e in zip(starts, ends, strict=True))
    delivered = sum(e["received"] - s["received"] for s, e in zip(starts, ends, strict=True))
    cpu = sum(e["cpu"] - s["cpu"] for s, e in zip(starts, ends, strict=True))
    waits = [
        e["wait"] - s["wait"]
        for s, e in zip(starts, ends, strict=True)
        if e.get("wait") is not None and s.get("wait") is not None
    ]
    hist = merge(r["histogram"] for r in replies)
    lost = sum(r["lost"] for r in replies)
    reordered = sum(r["reordered"] for r in replies)
    duplicated = sum(r["duplicated"] for r in replies)
    closed = sum(r["closed"] for r in replies)
    cores = min(usableCores(), len(replies))
    benchShare = cpuShare(cpu, wall)
    result.update(
        {
            "senders": options["senders"],
            "inflight": options["inflight"] if result["mode"] == "throughput" else None,
            "offered_rate": rate,
            "duration": round(wall, 3),
            "sent_total": totalSent,
            "sent_per_s": round(sent / wall, 1),
            "deliveries_per_s": round(delivered / wall, 1),
            "latency_ms": latencySummary(hist),
            "verified_clients": sum(r["verified"] for r in replies),
            "lost": lost,
            "reordered": reordered,
            "duplicated": duplicated,
            "dropped": closed,
            "bench_cpu": round(benchShare, 3),
            "bench_cores": cores,
        }
    )
    if waits:
        result["bench_cpu_wait"] = round(sum(waits) / wall / len(waits), 3)
    if serverCpu.get("start") is not None and serverCpu.get("end") is not None:
        span = float(serverCpu["endTime"] or 0) - float(serverCpu["startTime"] or 0)
        result["server_cpu"] = round(
            cpuShare(float(serverCpu["end"] or 0) - float(serverCpu["start"] or 0), span), 3
        )
        if serverCpu.get("startWait") is not None and serverCpu.get("endWait") is not None:
            waited = float(serverCpu["endWait"] or 0) - float(serverCpu["startWait"] or 0)
            result["server_cpu_wait"] = round(cpuShare(waited, span), 3)
    # Time spent runnable but not running: other processes had the CPU.
    for who in ("server", "bench"):
        share = result.get(f"{who}_cpu_wait")
        if share is not None and share > 0.1:
            warnings.append(
                f"the {who} waited for a CPU {share:.0%} of the time: the machine is "
                "busy with other work, so these figures are noisy"
            )
    if benchShare > BUSY * cores:
        warnings.append(
            f"the load tool used {benchShare:.0%} of its {cores} core(s): it may be the "
            "bottleneck; give it more cores (--processes) or fewer clients"
        )
    if result["mode"] == "throughput" and result.get("server_cpu") is not None:
        if result["server_cpu"] + result.get("server_cpu_wait", 0) < BUSY:
            warnings.append(
                f"the server used only {result['server_cpu']:.0%} CPU: it was not saturated"
            )
    if lost or reordered or duplicated:
        warnings.append(f"{lost} deliveries lost, {reordered} reordered, {duplicated} duplicated")
    if closed:
        warnings.append(f"the server closed {closed} connections during the run")
    result["warnings"] = warnings
    return result
