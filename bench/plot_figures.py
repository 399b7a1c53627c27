"""Draws the end-to-end figures from bench/figures.py's and bench/peers.py's JSON (CPU only).

    python3 bench/plot_figures.py docs/perf/2026-11-26-h200-e2e --out docs/img

A file NAME_rerun.json replaces, run by run (same point and mode), the runs of NAME.json that
were capped or skipped; peers_*.json files are all drawn side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"fused": "#2ca02c", "dynamic": "#ff7f0e", "instances": "#d62728", "serial": "#7f7f7f"}


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"fig_{name}.json"
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    rerun = folder / f"fig_{name}_rerun.json"
    if rerun.exists():
        new = {(str(r["point"]), r["mode"]): r for r in json.loads(rerun.read_text())["runs"]
               if "metrics" in r}
        res["runs"] = [new.get((str(r["point"]), r["mode"]), r)
                       if "skipped" in r or r.get("capped") else r for r in res["runs"]]
    return res


def ok(r: dict) -> bool:
    return "metrics" in r and not r.get("capped")


def series(res: dict, mode: str, key, shuffle: bool | None = None):
    xs, ys = [], []
    for r in res["runs"]:
        if r["mode"] != mode or not ok(r) or (shuffle is not None and r.get("shuffle") != shuffle):
            continue
        xs.append(r["point"])
        ys.append(key(r["metrics"]))
    return xs, ys


def title(res: dict, what: str) -> str:
    return f"{what}: {res['model']} {res['dtype']}, {res['card']}, {res['date']}"


def total(m):
    return m["total_time_s"]


def tps(m):
    return m["tokens_per_s"]


def lol(m):
    return m["latency_over_lone"]


PANELS = ((total, "total time (s)"), (tps, "output tokens/s"),
          (lol, "mean latency / lone request's"))


def three_panels(res: dict, out: Path, name: str, what: str, xlabel: str, lines, panels=PANELS,
                 log_y=(), style_x=None) -> None:
    """One row of three panels (a metric each) with a line per `lines` entry:
    (label, color, mode, shuffle filter)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (ax, (key, label)) in enumerate(zip(axes, panels, strict=True)):
        for line_label, c, mode, shuffle in lines:
            xs, ys = series(res, mode, key, shuffle)
            if xs:
                ax.plot(xs, ys, "o-", color=c, label=line_label)
        if style_x is not None:
            style_x(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if i in log_y:
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle(title(res, what))
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)


MODE_LINES = [(mode, c, mode, None) for mode, c in COLORS.items()]


def fig_constant(res: dict, out: Path) -> None:
    def style_x(ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16, 32], ["1", "2", "4", "8", "16", "32"])

    three_panels(res, out, "e2e_constant.png", "Constant interval",
                 "requests (100 ms apart, 128 new tokens each)", MODE_LINES, log_y=(1, 2),
                 style_x=style_x)


def fig_poisson(res: dict, out: Path) -> None:
    three_panels(res, out, "e2e_poisson.png", "Poisson arrivals",
                 "mean interval (ms), Poisson, 32 requests x 128 tokens", MODE_LINES,
                 log_y=(0, 2), style_x=lambda ax: ax.set_xscale("log"))


def fig_shuffle(res: dict, out: Path) -> None:
    lines = [("fused, shuffle", COLORS["fused"], "fused", True),
             ("fused, no shuffle", "#9467bd", "fused", False)]
    panels = (*PANELS[:2], (lambda m: m["mean_latency_s"], "mean latency (s)"))
    three_panels(res, out, "e2e_shuffle.png", "Random lengths, memory shuffle",
                 "max output length (uniform 1..L); 32 requests, 16 slots, all at 0 ms", lines,
                 panels=panels)


def fig_memory(fixed: dict | None, rnd: dict | None, out: Path) -> None:
    runs = [r for res in (fixed, rnd) if res for r in res["runs"] if ok(r)]
    points = list(dict.fromkeys(str(r["point"]) for r in runs))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(13, 7.5), sharex=True)
    w = 0.38
    for j, (mode, c) in enumerate((("fused", COLORS["fused"]), ("instances", COLORS["instances"]))):
        for i, p in enumerate(points):
            r = next((r for r in runs if str(r["point"]) == p and r["mode"] == mode), None)
            if r is None:
                continue
            m = r["metrics"]
            x = i + (j - 0.5) * w
            ax1.bar(x, m["total_time_s"], w, color=c, label=mode if i == 0 or p == points[0] else None)
            ax1.text(x, m["total_time_s"], f"{m['total_time_s']:.1f}", ha="center", va="bottom", fontsize=7)
            ax2.bar(x, m["peak_memory_bytes"] / 2**30, w, color=c)
            ax2.text(x, m["peak_memory_bytes"] / 2**30, f"{m['peak_memory_bytes'] / 2**30:.1f}",
                     ha="center", va="bottom", fontsize=7)
    ax1.set_yscale("log")
    ax1.set_ylabel("total time (s)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[m]) for m in ("fused", "instances")]
    ax1.legend(handles, ["fused", "instances"])
    ax2.set_ylabel("peak GPU memory allocated (GiB, model included)")
    ax2.set_xticks(range(len(points)), points)
    ax2.set_xlabel("requests @ interval ms; f: fixed 128 tokens, r: random 1..128 (with shuffle)")
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3)
    res = fixed or rnd
    fig.suptitle(title(res, "32 and 64 requests"))
    fig.tight_layout()
    fig.savefig(out / "e2e_memory.png", dpi=100)
    plt.close(fig)


def fig_headline(res: dict, out: Path) -> None:
    runs = [r for r in res["runs"] if ok(r)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    names = [r["mode"] for r in runs]
    for ax, key, label in ((axes[0], total, "total time (s)"),
                           (axes[1], lol, "mean latency / lone request's")):
        vals = [key(r["metrics"]) for r in runs]
        ax.bar(names, vals, color=[COLORS[n] for n in names])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[1].axhline(1.05, color="black", linestyle="--", linewidth=1)
    axes[1].text(-0.4, 1.05, "target 1.05", va="bottom", fontsize=8)
    for r in runs:
        if r.get("in_flight"):
            ts, ns = zip(*r["in_flight"], strict=True)
            axes[2].step(ts, ns, where="post", color=COLORS[r["mode"]], label=r["mode"], linewidth=1)
    axes[2].set_xscale("symlog", linthresh=30)
    axes[2].set_xlabel("time since the first arrival (s)")
    axes[2].set_ylabel("requests in flight")
    axes[2].legend(fontsize=8)
    axes[2].grid(alpha=0.3)
    fig.suptitle(title(res, "32 requests 500 ms apart, 504 tokens each"))
    fig.tight_layout()
    fig.savefig(out / "e2e_headline.png", dpi=100)
    plt.close(fig)


def fig_peers(folder: Path, out: Path) -> None:
    files = sorted(p for p in folder.glob("peers*.json") if "quick" not in p.name)
    if not files:
        return
    sets = [json.loads(p.read_text()) for p in files]
    engines = list(dict.fromkeys(r["engine"] for s in sets for r in s["runs"] if r.get("tokens_per_s")))
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(engines) + 1.8))
    h = 0.8 / len(sets)
    for j, (s, p) in enumerate(zip(sets, files, strict=True)):
        for i, e in enumerate(engines):
            r = next((r for r in s["runs"] if r["engine"] == e and r.get("tokens_per_s")), None)
            if r is None:
                continue
            y = i + (j - (len(sets) - 1) / 2) * h
            c = COLORS["fused"] if e.startswith("flover") else "#1f77b4"
            ax.barh(y, r["tokens_per_s"], h * 0.9, color=c, alpha=1 - 0.35 * j)
            ax.text(r["tokens_per_s"], y, f" {r['tokens_per_s']:.0f} ({p.stem})", va="center", fontsize=7)
    ax.set_yticks(range(len(engines)), [e.replace("transformers ", "") for e in engines], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("output tokens/s (first submission to last token)")
    s = sets[0]
    ax.set_title(f"{s['requests']} requests x {s['new_tokens']} tokens, {s['model']} {s['dtype']}, "
                 f"{s['card']}, transformers {s['transformers']}, {s['date']}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "e2e_peers.png", dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()
    folder, out = Path(args.folder), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in (("constant", fig_constant), ("poisson", fig_poisson), ("shuffle", fig_shuffle),
                     ("headline", fig_headline)):
        res = load(folder, name)
        if res:
            fn(res, out)
            print(f"wrote {out}/e2e_{name}.png")
    fixed, rnd = load(folder, "memory_fixed"), load(folder, "memory_random")
    if fixed or rnd:
        fig_memory(fixed, rnd, out)
        print(f"wrote {out}/e2e_memory.png")
    fig_peers(folder, out)
    print(f"wrote {out}/e2e_peers.png")


if __name__ == "__main__":
    main()
