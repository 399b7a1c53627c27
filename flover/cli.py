"""The `flover` command: generate | run | serve | bench."""

from __future__ import annotations

import argparse
import sys

from flover.config import ConfigError, SamplingParams
from flover.models import ModelFormatError


def cmd_generate(args: argparse.Namespace) -> int:
    from flover import Engine, EngineConfig

    eng = Engine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                              max_concurrency=1, max_seq_len=args.max_seq_len))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    prompt = args.prompt
    if eng.tokenizer is not None and eng.tokenizer.chat_template and not args.raw:
        chat = eng.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        prompt = eng.tokenizer.encode(chat, add_special_tokens=False)
    eng.add_request("cli", prompt, params)
    for out in eng.run_until_done():
        sys.stdout.write(out.new_text if eng.tokenizer else f"{out.new_token_ids[0]} ")
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


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
    g.add_argument("--device", default="auto")
    g.add_argument("--max-seq-len", type=int, default=2048)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ModelFormatError, ValueError) as e:
        print(f"flover: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
