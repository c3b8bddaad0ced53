"""
A run's result as a few lines of text for people.
"""

from __future__ import annotations

from typing import Any


def describe(result: dict[str, Any]) -> str:
    """A few human lines for one run."""
    lines = [f"{result['server']} ({result['url']}): {result['mode']}"]
    lines.append(
        f"  clients      {result['connected']} connected of {result['clients']}"
        f" ({result['processes']} bench process(es))"
        + (f", spread over {result['daemons']} daemons" if result["daemons"] > 1 else "")
    )
    if result.get("handshakes_per_s") is not None:
        lines.append(f"  handshakes   {result['handshakes_per_s']:,.0f}/s")
    if result["mode"] == "idle":
        if "rss_per_connection" in result:
            lines.append(f"  server RSS   {result['rss_per_connection'] / 1024:.1f} KiB/connection")
        lines.append(f"  held         {result['held']}")
    else:
        lat = result["latency_ms"]

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        if result["mode"] == "rate":
            lines.append(f"  offered      {result['offered_rate']:g} msg/s")
        else:
            lines.append(f"  senders      {result['senders']} x {result['inflight']} in flight")
        lines.append(f"  sent         {result['sent_per_s']:,.1f} msg/s")
        lines.append(f"  deliveries   {result['deliveries_per_s']:,.0f}/s")
        lines.append(
            f"  latency ms   p50 {ms(lat['p50'])}  p90 {ms(lat['p90'])}  p99 {ms(lat['p99'])}"
            f"  max {ms(lat['max'])}  ({lat['samples']:,} samples)"
        )
        lines.append(
            f"  lost {result['lost']}  reordered {result['reordered']}"
            f"  duplicated {result['duplicated']}"
        )
        cpu = f"  bench CPU    {result['bench_cpu']:.0%} of {result['bench_cores']} core(s)"
        if result.get("server_cpu") is not None:
            cpu += f"; server CPU {result['server_cpu']:.0%}"
        if result.get("server_cpu_wait") is not None:
            cpu += f" (waited for a CPU {result['server_cpu_wait']:.0%})"
        lines.append(cpu)
    for w in result.get("warnings", []):
        lines.append(f"  WARNING: {w}")
    return "\n".join(lines)
