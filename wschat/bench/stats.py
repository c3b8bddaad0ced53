"""
Latency histograms that merge across processes, and the run's summary figures.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping

#: Values below this many µs are kept exactly; above it, to about 0.1 %.
_EXACT = 1024
_EXACT_BITS = _EXACT.bit_length() - 1


def quantize(micros: int) -> int:
    """Round ``micros`` down to its histogram bucket (exact below 1 ms, ~0.1 % above)."""
    if micros < _EXACT:
        return max(micros, 0)
    shift = micros.bit_length() - _EXACT_BITS - 1
    return (micros >> shift) << shift


def histogram(values: Iterable[int]) -> Counter[int]:
    """A histogram of latencies (µs), small enough to send between processes."""
    return Counter(map(quantize, values))


def merge(histograms: Iterable[Mapping[int, int]]) -> Counter[int]:
    total: Counter[int] = Counter()
    for h in histograms:
        total.update(h)
    return total


def percentiles(hist: Mapping[int, int], points: Iterable[float]) -> dict[float, int | None]:
    """
    The value (µs) at each percentile in ``points`` (nearest-rank), or None when empty.

    ``100`` gives the maximum (to the histogram's precision).
    """
    wanted = sorted(points)
    result: dict[float, int | None] = {p: None for p in wanted}
    count = sum(hist.values())
    if not count:
        return result
    ranks = [(p, max(1, -(-count * p // 100))) for p in wanted]
    seen = 0
    k = 0
    for value in sorted(hist):
        seen += hist[value]
        while k < len(ranks) and seen >= ranks[k][1]:
            result[ranks[k][0]] = value
            k += 1
        if k == len(ranks):
            break
    return result


def latencySummary(hist: Mapping[int, int]) -> dict[str, float | None]:
    """p50/p90/p99/max in milliseconds, and how many latencies they are drawn from."""
    points = percentiles(hist, (50, 90, 99, 100))
    names = {50: "p50", 90: "p90", 99: "p99", 100: "max"}

    def ms(v: int | None) -> float | None:
        return None if v is None else round(v / 1000, 3)

    summary: dict[str, float | None] = {names[int(p)]: ms(v) for p, v in points.items()}
    summary["samples"] = sum(hist.values())
    return summary


def usableCores() -> int:
    """How many cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpuShare(cpuSeconds: float, wallSeconds: float) -> float:
    """CPU time over wall time, as a fraction of one core."""
    return cpuSeconds / wallSeconds if wallSeconds > 0 else 0.0


def processCpuSeconds(pid: int) -> float | None:
    """User plus system CPU seconds of process ``pid`` so far (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def processRssBytes(pid: int) -> int | None:
    """Resident set size of process ``pid`` in bytes (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def processWaitSeconds(pid: int | str) -> float | None:
    """
    Seconds process ``pid`` (its main thread) has spent runnable but waiting for a CPU
    (Linux /proc/PID/schedstat), or None. Growing fast means the machine is busy elsewhere.
    """
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None
