"""
A chart of a rate sweep: latency percentiles against offered load (needs matplotlib).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def plot(results: Sequence[dict[str, Any]], path: str) -> None:
    """Latency percentiles against offered load, one colour per server (needs matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "wschat.bench: --plot needs matplotlib: pip install 'wschat[plot]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    servers: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if r["mode"] == "rate":
            servers.setdefault(r["server"], []).append(r)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, runs) in enumerate(servers.items()):
        runs.sort(key=lambda r: r["offered_rate"])
        x = [r["offered_rate"] * r["connected"] for r in runs]
        colour = colours[k % len(colours)]
        for point, style in (("p50", "-"), ("p99", "--")):
            y = [r["latency_ms"][point] for r in runs]
            ax.plot(x, y, style, marker="o", color=colour, label=f"{name} {point}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    loads = sorted({r["offered_rate"] * r["connected"] for r in results if r["mode"] == "rate"})
    ax.set_xticks(loads)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("offered load (deliveries/s = messages/s × clients)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Broadcast latency against offered load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
