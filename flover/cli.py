"""The `flover` command: generate | run | serve | bench."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import signal
import sys

from flover.config import QUANTIZATIONS, ConfigError, SamplingParams
from flover.models import ModelFormatError


def cmd_generate(args: argparse.Namespace) -> int:
    from flover import Engine, EngineConfig

    tp = args.tensor_para_size or int(os.environ.get("WORLD_SIZE", "1"))
    eng = Engine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                              max_concurrency=1, max_seq_len=args.max_seq_len,
                              tensor_para_size=tp, batch_invariant=args.batch_invariant,
                              async_scheduling=args.async_scheduling,
                              quantization=args.quantization))
    if eng.follower:  # tensor parallelism: rank 0 plans, samples and prints
        eng.follow()
        return 0
    out = sys.stdout
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    prompt = args.prompt
    if eng.tokenizer is not None and eng.tokenizer.chat_template and not args.raw:
        chat = eng.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        prompt = eng.tokenizer.encode(chat, add_special_tokens=False)
    eng.add_request("cli", prompt, params)
    for o in eng.run_until_done():
        out.write(o.new_text if eng.tokenizer else f"{o.new_token_ids[0]} ")
        out.flush()
    out.write("\n")
    eng.close()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from flover import distributed
    from flover.engine import resolve_device, resolve_dtype
    from flover.run import report
    from flover.run import view as viz
    from flover.run.context import RunContext, new_state
    from flover.run.driver import follow_run, measure_lone, run_workload
    from flover.run.ini import load_config
    from flover.run.workload import build_workload

    cfg = load_config(args.config, args.set, args.model)
    if args.plot:
        report.require_matplotlib()  # fail before the run, not after it
    group = None
    if cfg.tensor_para_size > 1:  # every rank replays the same workload; rank 0 reports
        group = distributed.init_distributed(resolve_device(cfg.device))
        cfg.device = str(group.device)
    main = group is None or group.rank == 0
    console = Console() if main else Console(file=io.StringIO())  # followers print nothing
    with viz.status(console, f"loading {cfg.model_type} ..."):
        if group is None:
            ctx = RunContext.load(cfg)
        else:
            dtype = resolve_dtype(cfg.data_type, group.device)
            ctx = RunContext(cfg, *distributed.load_sharded(cfg.model_type, dtype, group, cfg.seed))
    if not main:  # tensor parallelism: rank 0 runs the workload and reports; this rank follows
        follow_run(ctx)
        return 0
    items = build_workload(cfg, ctx.tokenizer, ctx.model.cfg.vocab_size)
    state = new_state(cfg, items)
    with viz.status(console, f"a lone request first ({cfg.request_output_len} tokens) ..."):
        state.lone = measure_lone(ctx, items[0])
    device = next(ctx.model.parameters()).device
    report.reset_peak_memory(device)
    live = console.is_terminal and not args.no_live
    with viz.LiveView(state, console) if live else viz.PlainProgress(state, console):
        run_workload(ctx, items, state)
    metrics = report.summarize(state, device)
    console.print(report.render(metrics))
    if args.json:
        report.write_json(args.json, state, cfg, metrics)
        console.print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot, state, metrics)
        console.print(f"wrote {args.plot}")
    return 0


def serve_kv_layout(asked: str | None, tp: int) -> str:
    """`flover serve`'s KV layout: pages unless asked otherwise, slots under tensor parallelism
    (the paged layout is not broadcast to the other ranks yet)."""
    return asked or ("pages" if tp == 1 else "slots")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from flover.server.app import create_app
    except ImportError as e:
        print(f"flover: error: serve needs the serve extra (pip install 'flover[serve]'): {e}",
              file=sys.stderr)
        return 2
    from flover import Engine, EngineConfig

    tp = args.tensor_para_size or int(os.environ.get("WORLD_SIZE", "1"))
    eng = Engine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                              max_concurrency=args.max_concurrency, max_seq_len=args.max_seq_len,
                              kv_layout=serve_kv_layout(args.kv_layout, tp),
                              block_size=args.block_size,
                              num_kv_blocks=args.num_kv_blocks,
                              gpu_memory_utilization=args.gpu_memory_utilization,
                              enable_prefix_caching=args.enable_prefix_caching,
                              batch_invariant=args.batch_invariant,
                              async_scheduling=args.async_scheduling,
                              quantization=args.quantization, tensor_para_size=tp))
    if eng.follower:  # tensor parallelism: rank 0 serves HTTP; this rank runs its forwards
        # torchrun passes a SIGTERM to every rank: rank 0 drains, then close() ends this one
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        eng.follow()
        return 0
    app = create_app(eng, args.served_model_name, max_body_bytes=args.max_body_bytes,
                     max_prompts_per_request=args.max_prompts_per_request,
                     max_prompt_chars=args.max_prompt_chars, max_waiting=args.max_waiting,
                     queue_timeout=args.queue_timeout,
                     api_key=args.api_key or None, docs=args.enable_docs)
    ranks = f" (rank 0 of {tp}, pid {os.getpid()})" if tp > 1 else ""
    print(f"flover: serving {app.state.model_name!r} on http://{args.host}:{args.port}/v1{ranks}",
          file=sys.stderr)
    from flover.server.connections import IdleTimeoutH11

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=FLUSH_TIMEOUT_S, http=IdleTimeoutH11,
                            timeout_keep_alive=args.timeout_keep_alive)
    _draining_server(uvicorn, config, args.drain_timeout).run()
    if not app.state.engine.alive:  # the engine thread has stopped: no step is in flight
        eng.close()  # tensor parallelism: the followers' follow() returns
    return 0


# after the drain, how long uvicorn waits for open connections to send their last bytes (the
# calls have ended by then: only slow readers take that long) before cancelling them
FLUSH_TIMEOUT_S = 5.0


def _draining_server(uvicorn, config, drain_timeout: float):
    """A uvicorn.Server whose SIGTERM / SIGINT drains before it stops.

    uvicorn alone closes the listening socket at once, then waits for the open connections,
    streams included, with no way to end them, and re-raises the signal afterwards (exit code
    -15 / -2). Here the first signal only starts AsyncEngine.drain: the socket stays open so
    that new requests get a 503 (code server_shutting_down) instead of a refused connection,
    calls in flight get `drain_timeout` seconds, the rest are cut off with an error. Then
    uvicorn's own shutdown runs (flush, lifespan: the engine thread stops) and the process
    exits 0. A second signal cuts the drain short; a third skips the flush too.
    """
    log = logging.getLogger("uvicorn.error")

    class DrainingServer(uvicorn.Server):
        def __init__(self, config) -> None:
            super().__init__(config)
            self.signals = 0
            self._drain: asyncio.Task | None = None
            self._cut: asyncio.Event | None = None

        def handle_exit(self, sig: int, frame) -> None:
            # a signal handler interrupts the event loop anywhere: set flags only (no
            # _captured_signals either, so that uvicorn does not re-raise the signal)
            self.signals += 1
            if not self.started:
                self.should_exit = True  # still starting up: nothing is in flight
            elif self.should_exit:  # the drain is over and uvicorn is flushing
                self.force_exit = True

        async def on_tick(self, counter: int) -> bool:
            """uvicorn calls this every 0.1 s from its main loop: the signal's work starts
            here, on the event loop."""
            if self.signals and self._drain is None:
                self._cut = asyncio.Event()
                self._drain = asyncio.create_task(self._drain_then_exit())
            if self.signals >= 2 and self._cut is not None:
                self._cut.set()
            return await super().on_tick(counter)

        async def _drain_then_exit(self) -> None:
            aeng = self.config.app.state.engine
            log.info("Draining: no new requests; %d in flight get up to %g s (signal again "
                     "to stop now)", aeng.active, drain_timeout)
            try:
                cut = await aeng.drain(drain_timeout, self._cut)
                if cut:
                    log.warning("Drain over: cut off %d request(s) still in flight", cut)
            finally:
                self.should_exit = True

    return DrainingServer(config)


QUANT_HELP = ("weight-only quantization: int8 or int4 (group-wise, quantized at load; a GGUF "
              "file's blocks of that width kept as they are), auto (a GGUF file keeps its own "
              "Q4_0/Q4_1/Q8_0 tensors on the CPU), none (full precision)")

ASYNC_HELP = ("launch each iteration before reading the previous one's tokens, so that the host's "
              "work overlaps the GPU's (vLLM's flag; default: on with CUDA and --kv-layout slots "
              "on one rank; beams, counting penalties and prompt logprobs step synchronously)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flover", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream one completion to the terminal")
    g.add_argument("--prompt", required=True)
    g.add_argument("--model", default=None, help="preset, HF checkpoint dir or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--quantization", type=str.lower, default="auto", choices=QUANTIZATIONS,
                   help=QUANT_HELP)
    g.add_argument("--device", default="auto")
    g.add_argument("--max-seq-len", type=int, default=2048)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU: batch-invariant kernels (a request's logits bitwise the same "
                        "alone or fused); --no-batch-invariant uses cuBLAS and SDPA")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help=ASYNC_HELP)
    g.add_argument("--tensor-para-size", type=int, default=None, help="ranks to split the "
                   "model over (default: torchrun's WORLD_SIZE, else 1); launch with "
                   "`torchrun --nproc-per-node K -m flover.cli generate ...`")
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("run", help="replay an INI workload (the original Flover's format) "
                       "with a live view, then report latency and throughput")
    r.add_argument("config", help="the INI file, e.g. configs/demo.ini")
    r.add_argument("--model", default=None, help="overrides model_type: a preset, HF "
                   "checkpoint dir or .gguf file")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one key, e.g. runtime_hyperparameter.mode=serial (repeatable)")
    r.add_argument("--json", metavar="FILE", help="write every number and each request's "
                   "timeline as JSON")
    r.add_argument("--plot", metavar="FILE.png", help="draw in-flight requests over time and "
                   "a timeline bar per request (needs matplotlib)")
    r.add_argument("--no-live", action="store_true", help="a plain progress bar instead of "
                   "the live view")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, "
                       "/v1/chat/completions) over the fused engine")
    s.add_argument("--model", default=None, help="preset, HF checkpoint dir or .gguf file "
                   "(default: the embedded SmolLM2-135M-Instruct)")
    s.add_argument("--served-model-name", default=None, help="the model id clients send "
                   "(default: the preset's name, or the checkpoint's folder or file name)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-concurrency", type=int, default=8, help="rows in flight at most")
    s.add_argument("--max-seq-len", type=int, default=2048, help="longest prompt + output")
    s.add_argument("--kv-layout", choices=["pages", "slots"], default=None, help="pages (the "
                   "default): a pool of KV blocks taken as requests grow, shared prefixes cached; "
                   "slots: one max-seq-len slot per request (the original's; the default under "
                   "tensor parallelism, which pages do not support yet)")
    s.add_argument("--block-size", type=int, default=16, help="positions per KV block (pages)")
    s.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks in the pool "
                   "(default: from --gpu-memory-utilization on a GPU, the slots' memory on a CPU)")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of the "
                   "GPU's memory the engine may use, weights and KV pool together (pages)")
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=None, help="reuse the KV blocks of shared prompt prefixes "
                   "(default: on with pages)")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--quantization", type=str.lower, default="auto", choices=QUANTIZATIONS,
                   help=QUANT_HELP)
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU: batch-invariant kernels (see flover generate)")
    s.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help=ASYNC_HELP)
    s.add_argument("--tensor-para-size", type=int, default=None, help="ranks to split the "
                   "model over (default: torchrun's WORLD_SIZE, else 1); launch with "
                   "`torchrun --nproc-per-node K -m flover.cli serve ...`: rank 0 serves HTTP")
    s.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies "
                   "get a 413 (default: 4 MiB)")
    s.add_argument("--max-prompts-per-request", type=int, default=64, help="the most prompts "
                   "in one /v1/completions call")
    s.add_argument("--max-prompt-chars", type=int, default=None, help="the longest text prompt "
                   "or chat content, refused before tokenising (default: 32 x --max-seq-len)")
    s.add_argument("--max-waiting", type=int, default=256, help="with this many requests "
                   "waiting for a slot, new ones get a 429 with Retry-After")
    s.add_argument("--timeout-keep-alive", type=_positive, default=5.0, metavar="SECONDS",
                   help="close a connection that has sent nothing for this long while no request "
                   "is being answered: idle keep-alive connections, and clients that never send a "
                   "whole request (vLLM's flag)")
    s.add_argument("--queue-timeout", type=_positive, default=None, metavar="SECONDS",
                   help="a request that waits longer for a slot gets a 503 with Retry-After "
                   "(default: no limit)")
    # the environment variable keeps the key out of the process list
    s.add_argument("--api-key", default=os.environ.get("FLOVER_API_KEY"), help="require "
                   "'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize (default: "
                   "$FLOVER_API_KEY; unset: no key)")
    s.add_argument("--enable-docs", action="store_true", help="serve /docs, /redoc and "
                   "/openapi.json")
    s.add_argument("--drain-timeout", type=_non_negative, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT: new requests get a 503, requests in flight get "
                   "this long to finish, then the rest are ended with an error (default: 30)")
    s.set_defaults(func=cmd_serve)
    return p


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (ConfigError, ModelFormatError, ValueError) as e:
        print(f"flover: error: {e}", file=sys.stderr)
        return 2
    if rc == 0:
        from flover import distributed
        distributed.leave()  # tensor parallelism: this rank ended well (the others let it go)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
