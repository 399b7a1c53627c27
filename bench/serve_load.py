"""Serving load generator for OpenAI-compatible servers (flover serve, vLLM, SGLang, ...).

Sends random token-id prompts to `/v1/completions` with Poisson arrivals at each of several
request rates and reports, per rate: completed/failed requests, duration, request and output
token throughput, and TTFT / TPOT / ITL / end-to-end latency percentiles. Output: a table on
stdout, a JSON file (`--out`) and optionally a plot (`--plot`).

Why a script of our own: the established generators on PyPI are not light here (guidellm
requires torch and transformers, genai-bench transformers, datasets, locust and cloud SDKs;
`llmperf` on PyPI is an unrelated stub, the Ray project's one is not published; inference-perf
is not in the index) and vLLM's `benchmark_serving` ships inside vLLM. This one needs only
httpx (matplotlib for `--plot`) and never imports flover, so it runs on a client machine
that has neither flover nor torch.

Why token ids rather than text: prompt lengths are then exact, whatever the tokenizer, and
random-weight presets (no tokenizer at all) can be driven the same way; `--vocab` keeps the
ids below the model's vocabulary size. `ignore_eos` makes every request produce exactly
`--output-len` tokens, so rates are comparable.

Example (start the server, sweep five rates, write JSON and a plot):

    python bench/serve_load.py --start "flover serve --device cpu --max-concurrency 16" \\
        --input-len 64 --output-len 32 --rates 0.5,1,2,4,inf --num-prompts 40 \\
        --out serve_load.json --plot serve_load.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx


@dataclass
class Result:
    """One request's timings (seconds, relative to its own send time) and outcome."""

    ok: bool = False
    error: str = ""
    ttft: float = math.nan
    e2e: float = math.nan
    tokens: int = 0
    itl: list[float] = field(default_factory=list)


def finite(o: Any) -> Any:
    """NaN/inf become null: strict JSON readers (jq, JavaScript) reject Python's NaN and Infinity."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [finite(v) for v in o]
    return o


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), without needing numpy on the client."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def pcts(values: list[float]) -> dict[str, float]:
    """p50/p90/p99 and mean: the tail matters for serving, the mean for comparing with other tools."""
    return {"mean": sum(values) / len(values) if values else math.nan,
            "p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99)}


def headers(api_key: str | None) -> dict[str, str]:
    """Bearer auth only when a key is given: servers without auth may refuse unknown headers."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def one_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
                      hdrs: dict[str, str]) -> Result:
    """Stream one completion and time it.

    TTFT is the first chunk that carries output (token ids, or text for servers that ignore
    `return_token_ids`); ITL is the gap between consecutive such chunks, so a server that
    batches several tokens into one chunk shows larger, fewer gaps (as vLLM's benchmark does).
    """
    r = Result()
    t0 = time.perf_counter()
    last = t0
    try:
        async with client.stream("POST", url, json=payload, headers=hdrs) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                r.error = f"HTTP {resp.status_code}: {body[:200]}"
                return r
            usage_tokens = None
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    return r
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                n = 0
                for ch in chunk.get("choices", []):
                    ids = ch.get("token_ids")
                    n += len(ids) if ids is not None else (1 if ch.get("text") else 0)
                if n == 0:
                    continue
                if r.tokens == 0:
                    r.ttft = now - t0
                else:
                    r.itl.append(now - last)
                last = now
                r.tokens += n
            r.e2e = time.perf_counter() - t0
            if usage_tokens is not None:
                r.tokens = usage_tokens  # exact even when text chunks were counted
            r.ok = r.tokens > 0
            if not r.ok:
                r.error = "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"[:300]
    return r


def make_prompts(n: int, input_len: int, lo: int, hi: int, rng: random.Random) -> list[list[int]]:
    """Uniform random ids in [lo, hi): no shared prefix, so prefix caches cannot flatter TTFT."""
    return [[rng.randrange(lo, hi) for _ in range(input_len)] for _ in range(n)]


async def run_rate(client: httpx.AsyncClient, args: argparse.Namespace, model: str, rate: float,
                   prompts: list[list[int]], rng: random.Random) -> dict[str, Any]:
    """Send `prompts` with Poisson arrivals at `rate` (all at once for inf) and summarise."""
    url = args.base_url.rstrip("/") + "/v1/completions"
    hdrs = headers(args.api_key)
    sem = asyncio.Semaphore(args.max_inflight) if args.max_inflight else None

    async def send(p: list[int]) -> Result:
        payload = {"model": model, "prompt": p, "max_tokens": args.output_len, "temperature": 0,
                   "ignore_eos": True, "stream": True, "return_token_ids": True,
                   "stream_options": {"include_usage": True}}
        if sem is None:
            return await one_request(client, url, payload, hdrs)
        async with sem:
            return await one_request(client, url, payload, hdrs)

    tasks = []
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        if i and math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
        tasks.append(asyncio.create_task(send(p)))
    sent_in = time.perf_counter() - start
    results: list[Result] = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start

    ok = [r for r in results if r.ok]
    out_tokens = sum(r.tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "rate": "inf" if math.isinf(rate) else rate,  # JSON has no infinity
        "num_prompts": len(prompts),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "short": sum(1 for r in ok if r.tokens != args.output_len),
        "errors": errors,
        "duration_s": duration,
        "send_window_s": sent_in,
        # the rate the Poisson draws actually gave (few prompts: far from `rate`); null for inf
        "offered_rate": (len(prompts) - 1) / sent_in if math.isfinite(rate) and sent_in > 0 else math.inf,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + args.input_len * len(ok)) / duration,
        "output_tokens": out_tokens,
        "ttft_ms": {k: v * 1e3 for k, v in pcts([r.ttft for r in ok]).items()},
        "tpot_ms": {k: v * 1e3 for k, v in pcts(tpot).items()},
        "itl_ms": {k: v * 1e3 for k, v in pcts([g for r in ok for g in r.itl]).items()},
        "e2e_s": pcts([r.e2e for r in ok]),
    }


def fmt3(d: dict[str, float], digits: int) -> str:
    """p50/p90/p99 in one cell, so the table stays readable in a terminal and in markdown."""
    return "/".join(f"{d[k]:.{digits}f}" for k in ("p50", "p90", "p99"))


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table (also fine on a terminal): one row per rate."""
    head = ("| rate req/s | done | fail | dur s | req/s | out tok/s | TTFT ms p50/p90/p99 "
            "| TPOT ms p50/p90/p99 | ITL ms p50/p90/p99 | e2e s p50/p90/p99 |")
    lines = [head, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rate = r["rate"] if isinstance(r["rate"], str) else f"{r['rate']:g}"
        lines.append(f"| {rate} | {r['completed']} | {r['failed']} | {r['duration_s']:.1f} "
                     f"| {r['request_throughput']:.2f} | {r['output_token_throughput']:.1f} "
                     f"| {fmt3(r['ttft_ms'], 0)} | {fmt3(r['tpot_ms'], 1)} | {fmt3(r['itl_ms'], 1)} "
                     f"| {fmt3(r['e2e_s'], 2)} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Throughput and latency against rate; inf is a category, so the x axis is categorical."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["rate"] if isinstance(r["rate"], str) else f"{r['rate']:g}" for r in rows]
    x = list(range(len(rows)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(x, [r["output_token_throughput"] for r in rows], "o-", label="output tok/s")
    a.set_ylabel("output tokens/s")
    a2 = a.twinx()
    a2.plot(x, [r["request_throughput"] for r in rows], "s--", color="tab:orange", label="req/s")
    a2.set_ylabel("requests/s")
    a.set_title("throughput")
    a.legend(loc="upper left")
    a2.legend(loc="lower right")
    for key, style in (("p50", "o-"), ("p99", "o:")):
        b.plot(x, [r["ttft_ms"][key] for r in rows], style, color="tab:blue", label=f"TTFT {key}")
        b.plot(x, [r["tpot_ms"][key] for r in rows], style, color="tab:green", label=f"TPOT {key}")
    b.set_yscale("log")
    b.set_ylabel("ms")
    b.set_title("latency")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.set_xticks(x, labels)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def start_server(cmd: str, base_url: str, timeout: float, log_path: str | None) -> subprocess.Popen:
    """Start the server and wait for /health: loading a model can take a while, and a request
    sent before it is up would count as a failure of the first rate."""
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(shlex.split(cmd), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    url = base_url.rstrip("/") + "/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve_load: the server exited with {proc.returncode} before /health answered"
                             + (f" (log: {log_path})" if log_path else ""))
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"serve_load: {url} did not answer 200 within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM first so the server shuts down cleanly; SIGKILL only if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def discover(client: httpx.AsyncClient, args: argparse.Namespace) -> tuple[str, int | None]:
    """The model id and its max_model_len from /v1/models, so `--model` may be left out."""
    url = args.base_url.rstrip("/") + "/v1/models"
    try:
        resp = await client.get(url, headers=headers(args.api_key))
        resp.raise_for_status()
    except httpx.HTTPError as e:
        raise SystemExit(f"serve_load: {url}: {type(e).__name__}: {e} (is the server up? see --start)") from e
    data = resp.json()["data"]
    entry = next((m for m in data if m["id"] == args.model), None) if args.model else data[0]
    if entry is None:
        raise SystemExit(f"serve_load: model {args.model!r} not served; served: {[m['id'] for m in data]}")
    return entry["id"], entry.get("max_model_len")


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then sweep the rates in order with fresh random prompts for each."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.timeout, connect=30)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model, max_len = await discover(client, args)
        model_len = args.model_len or max_len
        if model_len is not None and args.input_len + args.output_len > model_len:
            raise SystemExit(f"serve_load: input {args.input_len} + output {args.output_len} tokens "
                             f"exceed the model length {model_len}")
        rng = random.Random(args.seed)
        hi = args.vocab
        if args.warmup:
            warm = await run_rate(client, args, model, math.inf,
                                  make_prompts(args.warmup, args.input_len, args.min_token_id, hi, rng), rng)
            if warm["failed"]:
                print(f"serve_load: warm-up failures: {warm['errors']}", file=sys.stderr)
        rows = []
        for rate in args.rates:
            prompts = make_prompts(args.num_prompts, args.input_len, args.min_token_id, hi, rng)
            row = await run_rate(client, args, model, rate, prompts, rng)
            rows.append(row)
            errs = f", errors {row['errors']}" if row["errors"] else ""
            print(f"rate {row['rate']}: {row['completed']}/{row['num_prompts']} ok in "
                  f"{row['duration_s']:.1f} s, {row['output_token_throughput']:.1f} out tok/s, "
                  f"TTFT p50 {row['ttft_ms']['p50']:.0f} ms, TPOT p50 {row['tpot_ms']['p50']:.1f} ms{errs}",
                  file=sys.stderr, flush=True)
    return {"model": model, "max_model_len": model_len, "rows": rows}


def parse_rates(s: str) -> list[float]:
    """'1,2,inf' -> [1.0, 2.0, inf]; a rate must be positive."""
    rates = [math.inf if x.strip().lower() == "inf" else float(x) for x in s.split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be positive numbers or inf")
    return rates


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, optionally start the server, run the sweep, write the outputs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--start", default=None, help="command starting the server; waits for /health, "
                   "stops it at the end")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--server-log", default=None, help="with --start: the server's stdout and stderr")
    p.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("FLOVER_API_KEY"))
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32000, help="token ids are drawn below this (the model's "
                   "vocabulary size or less)")
    p.add_argument("--min-token-id", type=int, default=0, help="lowest id drawn (e.g. to skip special ids)")
    p.add_argument("--model-len", type=int, default=None, help="max prompt + output tokens, checked before "
                   "sending (default: max_model_len of /v1/models, if it says)")
    p.add_argument("--rates", type=parse_rates, default=parse_rates("1,2,4,8,inf"),
                   help="requests/s, comma-separated; inf sends all at once")
    p.add_argument("--num-prompts", type=int, default=100, help="requests per rate")
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and not measured) before the sweep")
    p.add_argument("--max-inflight", type=int, default=0, help="client-side cap on open requests (0: none)")
    p.add_argument("--timeout", type=float, default=1800.0, help="per-request timeout, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--plot", default=None, help="PNG file: throughput and TTFT/TPOT against rate")
    p.add_argument("--note", default="", help="free text stored in the JSON and the plot title")
    args = p.parse_args(argv)
    if not 0 <= args.min_token_id < args.vocab:
        p.error("need 0 <= --min-token-id < --vocab")
    if args.input_len < 1 or args.output_len < 1 or args.num_prompts < 1:
        p.error("--input-len, --output-len and --num-prompts must be positive")

    proc = None
    if args.start:
        proc = start_server(args.start, args.base_url, args.start_timeout, args.server_log)
    try:
        started = datetime.now(UTC)
        res = asyncio.run(bench(args))
    finally:
        if proc is not None:
            stop_server(proc)
    rows = res["rows"]
    print(table(rows))
    cfg = {k: v for k, v in vars(args).items() if k not in ("api_key", "rates")}
    cfg["rates"] = ["inf" if math.isinf(r) else r for r in args.rates]
    doc = {"date": started.isoformat(timespec="seconds"), "host": platform.node(),
           "client_platform": platform.platform(), "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "model": res["model"], "max_model_len": res["max_model_len"],
           "config": cfg, "results": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(finite(doc), f, indent=1, default=str)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        title = (f"{res['model']}: {args.input_len} in / {args.output_len} out tokens, "
                 f"{args.num_prompts} requests per rate" + (f" ({args.note})" if args.note else ""))
        plot(rows, args.plot, title)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
