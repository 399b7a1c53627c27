"""The numbers at the end of a run: a table in the terminal, a JSON file and a PNG plot.

Latency is arrival to last token; time to first token is arrival to first token; time per
output token is (last token - first token) / (tokens - 1). The ratio to a lone request
compares the mean latency with what each request would take alone: the lone request's time
to first token plus (its tokens - 1) times the lone time per output token (for fixed
lengths this is simply the mean latency over the lone request's latency).
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from flover.config import ConfigError
from flover.run.ini import RunConfig
from flover.run.timeline import RunState


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """GPU memory allocated at the peak of the run, or the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "gpu_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process_max_rss"


def _pct(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p90": None, "max": None}
    a = np.asarray(xs, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "max": float(a.max())}


def summarize(state: RunState, device: torch.device) -> dict:
    recs = [r for r in state.records if r.finish is not None]
    total = max((r.finish for r in recs), default=0.0)
    tokens = sum(r.tokens for r in recs)
    latencies = [r.latency for r in recs]
    mem, mem_kind = peak_memory(device)
    m = {
        "mode": state.mode, "requests": len(state.records), "finished": len(recs),
        "total_time_s": total, "output_tokens": tokens,
        "tokens_per_s": tokens / total if total > 0 else None,
        "iterations": state.iterations, "shuffle_moves": state.shuffle_moves,
        "latency_s": _pct(latencies), "mean_latency_s": float(np.mean(latencies)) if recs else None,
        "ttft_s": _pct([r.ttft for r in recs]),
        "tpot_s": _pct([r.tpot for r in recs if r.tpot is not None]),
        "peak_memory_bytes": mem, "peak_memory_kind": mem_kind,
        "lone": state.lone, "latency_over_lone": None,
    }
    if state.lone and recs:
        lone = state.lone
        alone = [lone["ttft"] + (r.tokens - 1) * lone["tpot"] for r in recs]
        m["latency_over_lone"] = float(np.mean(latencies) / np.mean(alone))
    return m


def to_json(state: RunState, cfg: RunConfig, metrics: dict) -> dict:
    config = asdict(cfg)
    config.pop("given")
    return {
        "config": config, "metrics": metrics,
        "requests": [{
            "request_id": r.request_id, "prompt_len": r.prompt_len, "max_tokens": r.max_tokens,
            "output_tokens": r.tokens, "arrival_s": r.arrival, "admit_s": r.admit,
            "first_token_s": r.first_token, "finish_s": r.finish, "latency_s": r.latency,
            "ttft_s": r.ttft, "tpot_s": r.tpot, "text": r.text} for r in state.records],
        "in_flight": [{"t_s": t, "requests": n} for t, n in state.samples],
    }


def write_json(path: str | Path, state: RunState, cfg: RunConfig, metrics: dict) -> None:
    Path(path).write_text(json.dumps(to_json(state, cfg, metrics), indent=1) + "\n")


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def render(metrics: dict):
    """The report as rich renderables: the percentiles, then the totals."""
    from rich.console import Group
    from rich.table import Table

    m = metrics
    pct = Table(title=f"flover run: {m['mode']}, {m['finished']}/{m['requests']} requests",
                header_style="bold", title_justify="left", title_style="bold")
    pct.add_column("per request")
    for c in ("p50", "p90", "max"):
        pct.add_column(c, justify="right")
    for name, key in (("latency", "latency_s"), ("time to first token", "ttft_s"),
                      ("time per output token", "tpot_s")):
        pct.add_row(name, *(_fmt_s(m[key][c]) for c in ("p50", "p90", "max")))
    tps = m["tokens_per_s"]
    mem = "GPU memory (peak allocated)" if m["peak_memory_kind"] == "gpu_max_allocated" \
        else "peak memory (process RSS)"
    tot = Table(show_header=False)
    tot.add_column("total")
    tot.add_column("value", justify="right")
    tot.add_row("total time", _fmt_s(m["total_time_s"]))
    tot.add_row("output tokens", str(m["output_tokens"]))
    tot.add_row("tokens/s", f"{tps:.1f}" if tps else "-")
    tot.add_row("iterations (forward passes)", str(m["iterations"]))
    tot.add_row(mem, f"{m['peak_memory_bytes'] / 2**20:.0f} MiB")
    if m["mode"] == "fused":
        tot.add_row("shuffle moves", str(m["shuffle_moves"]))
    if m["latency_over_lone"] is not None:
        lone = m["lone"]
        tot.add_row("mean latency / a lone request's", f"{m['latency_over_lone']:.2f}x")
        tot.add_row("lone request", f"{_fmt_s(lone['latency'])} for {lone['tokens']} tokens")
    return Group(pct, tot)


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'flover[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(path: str | Path, state: RunState, metrics: dict) -> None:
    """Top: requests in flight over time. Bottom: one bar per request (waiting, prefill up to
    its first token, decoding), its arrival marked."""
    plt = require_matplotlib()
    recs = state.records
    fig, (ax1, ax2) = plt.subplots(
        2, 1, sharex=True, figsize=(10, 3 + 0.28 * len(recs)),
        gridspec_kw={"height_ratios": [1, max(1.5, 0.12 * len(recs))]})
    if state.samples:
        ts, ns = zip(*state.samples, strict=True)
        ax1.step([0.0, *ts], [0, *ns], where="pre", color="#1f77b4")
        ax1.fill_between([0.0, *ts], [0, *ns], step="pre", alpha=0.25, color="#1f77b4")
    if state.mode != "instances":
        ax1.axhline(state.max_concurrency, color="#999", linestyle="--", linewidth=1)
        ax1.text(0, state.max_concurrency, " slots", va="bottom", fontsize=8, color="#666")
    ax1.set_ylabel("in flight")
    ax1.set_ylim(0, max([state.max_concurrency if state.mode != "instances" else 1,
                         *(n for _, n in state.samples)]) * 1.15)
    ax1.grid(alpha=0.3)
    tps = metrics["tokens_per_s"] or 0.0
    ax1.set_title(f"flover run · {state.mode} · {len(recs)} requests · "
                  f"{metrics['total_time_s']:.1f} s · {tps:.1f} tokens/s")
    colors = {"wait": "#d9d9d9", "prefill": "#ff9f40", "decode": "#2ca02c"}
    for i, r in enumerate(recs):
        y = len(recs) - 1 - i
        admit = r.admit if r.admit is not None else r.arrival
        first = r.first_token if r.first_token is not None else admit
        end = r.finish if r.finish is not None else first
        for (a, b), c in (((r.arrival, admit), "wait"), ((admit, first), "prefill"),
                          ((first, end), "decode")):
            if b > a:
                ax2.barh(y, b - a, left=a, height=0.6, color=colors[c])
        ax2.plot([r.arrival], [y], marker="|", color="black", markersize=10)
        ax2.text(end, y, f" {r.tokens}", va="center", fontsize=7, color="#444")
    ax2.set_yticks(range(len(recs)), [r.request_id for r in reversed(recs)], fontsize=8)
    ax2.set_xlabel("time since the first arrival (s)")
    ax2.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[c]) for c in colors]
    ax2.set_xlim(left=0)
    fig.legend(handles, ["waiting", "prefill → first token",
                         "decoding (number: output tokens)"],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
