#!/usr/bin/env python3
"""Draw the results of benchmarks/run.py as a PNG.

    python benchmarks/chart.py benchmarks/results.json benchmarks/results.png

One panel per load scenario (messages per second, higher is better, median over runs with the
range of the runs as a thin line), one panel of p99 latency across the load scenarios (log
scale, lower is better), and one of server memory per idle connection (lower is better).
"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

COLORS = {
    "c": "#4d4d4d",
    "pyuds": "#d62728",
    "uvloop": "#1f77b4",
    "asyncio": "#7fb2e5",
    "asyncio_streams": "#2ca02c",
    "socketserver": "#ff7f0e",
}
LOAD_SCENARIOS = ("latency", "pipelined", "many", "large")
FALLBACK = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def human(v: float, _pos=None) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            s = f"{v / div:.1f}".rstrip("0").rstrip(".")
            return s + suffix
    return f"{v:.0f}" if v >= 10 or v == 0 else f"{v:.1f}"


def size_text(n: int) -> str:
    for div, suffix in ((1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div and n % div == 0:
            return f"{n // div} {suffix}"
    return f"{n} B"


def color(server: str, servers: list[str]) -> str:
    return COLORS.get(server) or FALLBACK[servers.index(server) % len(FALLBACK)]


def run_range(raw: list[dict], scenario: str, server: str, key: str) -> tuple[float, float] | None:
    vals = [r["result"][key] for r in raw
            if r["scenario"] == scenario and r["server"] == server and r.get("status") == "ok"
            and r.get("result") and r["result"].get(key) is not None]
    return (min(vals), max(vals)) if len(vals) > 1 else None


def bar_panel(ax, doc: dict, scenario: str, key: str, title: str, ylabel: str) -> None:
    servers = doc["config"]["servers"]
    med = doc["median"].get(scenario, {})
    raw = doc.get("raw", [])
    xs = range(len(servers))
    ranges = {s: run_range(raw, scenario, s, key) for s in servers}
    top = max([med.get(s, {}).get(key) or 0 for s in servers]
              + [r[1] for r in ranges.values() if r] + [1])
    for x, srv in zip(xs, servers):
        e = med.get(srv, {})
        v = e.get(key)
        if v is None:
            label = "n/a" if e.get("status") == "n/a" else ("FAILED" if e.get("failed") else "-")
            ax.text(x, top * 0.02, label, ha="center", va="bottom", fontsize=9, rotation=90,
                    color="#b00000" if label == "FAILED" else "#555555")
            continue
        ax.bar(x, v, color=color(srv, servers), width=0.75, edgecolor="black", linewidth=0.4)
        rng = ranges[srv]
        if rng:
            ax.plot([x, x], rng, color="black", linewidth=1)
        ax.text(x, max(v, rng[1] if rng else v) + top * 0.015, human(v), ha="center",
                va="bottom", fontsize=8)
        if e.get("failed"):
            ax.text(x, v / 2, "FAILED\nruns", ha="center", va="center", fontsize=7,
                    color="white", fontweight="bold")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_xlim(-0.6, len(servers) - 0.4)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(servers, rotation=30, ha="right", fontsize=8)
    ax.yaxis.set_major_formatter(FuncFormatter(human))
    ax.set_ylim(0, top * 1.12)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def p99_panel(ax, doc: dict, scenarios: list[str]) -> None:
    servers = doc["config"]["servers"]
    n = len(servers)
    width = 0.8 / n
    highest, lowest = 1.0, float("inf")
    for i, srv in enumerate(servers):
        xs, vals = [], []
        for j, scen in enumerate(scenarios):
            v = doc["median"].get(scen, {}).get(srv, {}).get("p99_us")
            if v:
                xs.append(j - 0.4 + width * (i + 0.5))
                vals.append(v)
                highest, lowest = max(highest, v), min(lowest, v)
        if vals:
            ax.bar(xs, vals, width=width, color=color(srv, servers), label=srv,
                   edgecolor="black", linewidth=0.3)
    ax.set_yscale("log")
    if lowest != float("inf"):
        ax.set_ylim(lowest / 2, highest * 12)  # headroom for the legend
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.yaxis.set_major_formatter(FuncFormatter(human))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(-0.5, len(scenarios) - 0.5)
    ax.set_xticks(range(len(scenarios)))
    ax.set_xticklabels(scenarios, fontsize=9)
    ax.set_title("p99 latency (us, log scale; lower is better)", fontsize=10)
    ax.set_ylabel("microseconds", fontsize=9)
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.set_axisbelow(True)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python benchmarks/chart.py RESULTS.json OUT.png", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        doc = json.load(f)
    cfg = doc["config"]
    load = [s for s in LOAD_SCENARIOS if s in cfg["scenarios"]]
    panels = [("load", s) for s in load]
    if load:
        panels.append(("p99", None))
    if "idle" in cfg["scenarios"]:
        panels.append(("idle", "idle"))
    if not panels:
        print("chart.py: no scenarios in the results", file=sys.stderr)
        return 1

    ncols = min(3, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.3 * nrows + 0.9), squeeze=False)
    params = cfg.get("scenario_params", {})
    for ax, (kind, scen) in zip(axes.flat, panels):
        if kind == "load":
            p = params.get(scen, {})
            sub = (f"{p.get('conns')} conn{'s' * (p.get('conns') != 1)}, depth {p.get('depth')}, "
                   f"{size_text(p.get('size', 0))}") if p else ""
            bar_panel(ax, doc, scen, "msgs_per_s", f"{scen}: {sub}\nmessages/s (higher is better)",
                      "messages per second")
        elif kind == "p99":
            p99_panel(ax, doc, load)
        else:
            bar_panel(ax, doc, "idle", "bytes_per_conn",
                      f"idle: {cfg.get('idle_conns')} connections held open\n"
                      "server RSS per connection (lower is better)", "bytes per connection")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")

    m = doc.get("machine", {})
    runs = cfg.get("runs")
    title = (f"u32 echo over a Unix socket, one Python handler call per message — median of {runs} "
             f"run{'s' * (runs != 1)}, {cfg.get('duration_s')} s each"
             + "; bars: median, thin line: range over runs"
             + (" (QUICK smoke, not a benchmark)" if cfg.get("quick") else ""))
    sub = (f"{m.get('cpu_model')}, {m.get('nproc')} CPUs (server on CPU {m.get('server_cpu')}, "
           f"loadgen on CPU {m.get('loadgen_cpu')}); {m.get('kernel')}; Python {m.get('python')}, "
           f"pyuds {m.get('pyuds')}, uvloop {m.get('uvloop')}; {doc.get('date')}")
    if m.get("cpu_wakeup_latency"):
        sub += f"\nCPU wake-up latency {m['cpu_wakeup_latency']}"
    if not doc.get("ok", True):
        sub += "   !!! SOME RUNS FAILED: see the JSON"
    fig.suptitle(title + "\n" + sub, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96 - 0.02 * (nrows == 1)))
    fig.savefig(argv[2], dpi=110)
    print(f"chart.py: wrote {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
