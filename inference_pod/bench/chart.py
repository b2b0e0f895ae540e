"""The PNGs of ``lipsync bench service`` (throughput beside the replaced service's figures, latency
percentiles, and the live-stream deadline misses per number of streams) and ``lipsync bench sessions``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

OURS = "#1f77b4"
THEIRS = "#ff7f0e"
IN_PROCESS = "#9e9e9e"
PERCENTILES = (("p50_ms", "p50", "#9ecae1"), ("p95_ms", "p95", "#4292c6"), ("p99_ms", "p99", "#08519c"))


def write_chart(result: dict, path: Path) -> Path:
    rows = [r for r in result["scenarios"] if r.get("fps")]
    generated = [r for r in rows if r["scenario"] != "cache"]  # hits are lookups, not generation: latency only
    live = result.get("live", {}).get("levels", [])
    panels = 3 if live else 2
    fig, axes = plt.subplots(panels, 1, figsize=(11, 4.2 * panels), constrained_layout=True)
    fig.suptitle(f"lipsync bench service: {result['label']}", fontsize=11)
    _throughput(axes[0], generated, result.get("reference", {}))
    _latency(axes[1], rows)
    if live:
        _live(axes[2], live, result["live"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _throughput(ax, rows: list[dict], reference: dict) -> None:
    x = np.arange(len(rows))
    fps = [r["fps"] for r in rows]
    theirs = [reference.get(r["scenario"], {}).get("fps") for r in rows]
    has_ref = any(v is not None for v in theirs)
    width = 0.4 if has_ref else 0.7
    colors = [IN_PROCESS if r["scenario"].startswith("engine") else OURS for r in rows]
    bars = ax.bar(x - (width / 2 if has_ref else 0), fps, width, color=colors, label="this run, over gRPC")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    if IN_PROCESS in colors:
        ax.bar([0], [0], color=IN_PROCESS, label="this run, in-process engine (no service)")
    if has_ref:
        ref = ax.bar(x + width / 2, [v or 0 for v in theirs], width, color=THEIRS,
                     label="replaced service (its own hardware)")
        ax.bar_label(ref, labels=[f"{v:.1f}" if v else "" for v in theirs], fontsize=8)
    ax.set_xticks(x, [r["label"] for r in rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("frames / s")
    ax.set_title("Throughput", fontsize=10)
    ax.legend(fontsize=8)


def _latency(ax, rows: list[dict]) -> None:
    x = np.arange(len(rows))
    width = 0.8 / len(PERCENTILES)
    for k, (key, name, color) in enumerate(PERCENTILES):
        values = [r.get(key) or 0 for r in rows]
        ax.bar(x + (k - 1) * width, values, width, color=color, label=name)
    ax.set_yscale("log")
    ax.set_xticks(x, [r["label"] for r in rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("ms per request (log)")
    ax.set_title("Latency per request (a batch request returns all its frames at once)", fontsize=10)
    ax.legend(fontsize=8)


def _live(ax, levels: list[dict], summary: dict) -> None:
    streams = [r["streams"] for r in levels]
    missed = [100 * (r["miss_share"] or 0) for r in levels]
    ax.plot(streams, missed, marker="o", color=OURS, label="frames past their deadline")
    ax.set_xticks(streams)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("concurrent live audio streams (25 fps each)")
    ax.set_ylabel("% of frames missed")
    ax.set_title(f"Live streams: deadline = audio window complete + {summary['budget_ms']:.0f} ms; "
                 f"largest M with none missed: {summary['largest_streams_without_miss']}", fontsize=10)
    p95 = ax.twinx()
    values = [max(r.get("p95_ms") or 0, 1e-3) for r in levels]
    p95.plot(streams, values, marker="s", linestyle="--", color=THEIRS, label="p95 latency after the audio window (ms)")
    p95.axhline(summary["budget_ms"], color="grey", linewidth=0.8, linestyle=":")
    p95.set_yscale("log")
    p95.set_ylim(min(values + [summary["budget_ms"]]) / 2, max(values + [summary["budget_ms"]]) * 2)
    p95.set_ylabel("ms (log); dotted: the budget")
    lines = ax.get_legend_handles_labels()
    more = p95.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")


# ------------------------------------------------------------------------------------------ bench sessions

KIND_COLORS = (("speaking", "speaking", OURS), ("idle_cached", "idle from the cache (no network call)", "#74c476"),
               ("idle_computed", "idle computed", "#c7e9c0"), ("repeated", "repeated (not ready at its tick)",
                                                                   "#d62728"))


def write_sessions_chart(result: dict, path: Path) -> Path:
    """The PNG of a ``lipsync bench sessions`` run: repeated frames against the 1 % bar, latencies, and
    what the frames were, and the CPU each session cost the pod and the client, per number of sessions at once."""
    levels = result["levels"]
    fig, axes = plt.subplots(4, 1, figsize=(8, 11.5), constrained_layout=True)
    fig.suptitle(f"lipsync bench sessions: {result['label']}", fontsize=8)
    m = [r["sessions"] for r in levels]
    x = np.arange(len(levels))
    bar = 100 * result["max_repeated_share"]

    ax = axes[0]
    ax.plot(x, [100 * (r["repeated_share"] or 0) for r in levels], marker="o", color=OURS, label="repeated frames")
    ax.axhline(bar, color="grey", linestyle=":", linewidth=1, label=f"{bar:g} % bar")
    ax.set_ylabel("% of frames")
    ax.set_title(f"Repeated frames; largest M within the bar: {result['largest_sessions_within']}", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[1]
    for key, name, color, style in (("speech_latency", "speech", OURS, "-"), ("barge_in_latency", "barge-in",
                                                                               THEIRS, "-")):
        for pct, marker, dash in (("p50_ms", "o", style), ("p99_ms", "s", "--")):
            values = [r[key].get(pct) for r in levels]
            ax.plot(x, [v if v is not None else np.nan for v in values], marker=marker, linestyle=dash, color=color,
                    label=f"{name} {pct[:3]}")
    ax.set_ylabel("ms")
    ax.set_title("Latency at the client: speech (voiced chunk sent -> its frame), barge-in (clear -> next frame)",
                 fontsize=8)
    ax.legend(fontsize=7, ncol=2)

    ax = axes[2]
    bottom = np.zeros(len(levels))
    for key, name, color in KIND_COLORS:
        total = np.array([max(sum(r[k] for k, _, _ in KIND_COLORS), 1) for r in levels])
        share = 100 * np.array([r[key] for r in levels]) / total
        ax.bar(x, share, bottom=bottom, color=color, label=name)
        bottom += share
    ax.set_ylabel("% of frames")
    ax.set_title("What the frames were", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)

    ax = axes[3]
    for key, name, color in (("pod_cpu_per_session", "pod", OURS), ("client_cpu_per_session", "client (receivers)",
                                                                      THEIRS)):
        values = [r.get(key) for r in levels]
        ax.plot(x, [100 * v if v is not None else np.nan for v in values], marker="o", color=color, label=name)
    ax.set_ylabel("% of a core")
    ax.set_title("CPU per session (CPU seconds / wall seconds / sessions)", fontsize=9)
    ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(x, [str(v) for v in m])
    axes[3].set_xlabel("live sessions at once (25 fps each)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path
