"""The Hopper (sm_90a) machine code of the products' TMA forms, read without a GPU.

Compiles `quant_triton._quant_tma_kernel` and `linear_triton._linear_tma_kernel` in the
configurations the decode step launches, for sm_90a, with the installed triton, then runs its
ptxas with -v on the PTX: registers, spills, shared memory, and whether ptxas serialised the
warpgroup MMAs (its info C7515, "wgmma.mma_async instructions are serialized"): each wgmma
then waits for the one before it to finish, a whole MMA latency per 16 K of every step.

Why it matters: until 2026-12-08 the int8 / int4 kernel's K loop ran from a runtime start to a
runtime end, so it could run zero times, and the path that skips it set the accumulators to
zero with plain moves; ptxas then serialised every wgmma of the loop (C7515). Its part's length
is now a constexpr (a fixed trip count; steps past K read zeros by TMA) and the info is gone
(triton 3.6 with CUDA 12.8's ptxas, and triton 3.9 with 13.4's). The float16 linear's folded
forms (the RMSNorm epilogue, and with SiLU * up) had the same fault under triton 3.6 (not
3.9), which the GPU machines run: the fold measured slower than the separate kernels in
session 8 with every wgmma of its loop serialised; its trip count is a constexpr too now.
tests/test_sm90_codegen.py runs this and fails on C7515 or a spill.

    python3 bench/sm90_codegen.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flover.ops import launch
from flover.ops.attention_triton import (
    MERGE_SPLITS,
    _items_kernel,
    _ordered_combine_kernel,
    _split_items_kernel,
    _split_kernel,
)
from flover.ops.attention_triton import default_config as attention_config
from flover.ops.linear_triton import EPILOGUE_TILES, _linear_tma_kernel, tma_config
from flover.ops.paged_attention_triton import MAX_SPLITS, MIN_SPLIT, _paged_split_kernel
from flover.ops.quant_triton import BLOCK_M, _quant_tma_kernel
from flover.ops.quant_triton import tma_config as quant_tma_config

TARGET = GPUTarget("cuda", 90, 32)


def ptxas_path() -> str:
    from triton.backends.nvidia import compiler

    try:
        return compiler.get_ptxas(90).path  # triton 3.9: ptxas-blackwell past sm_90
    except TypeError:
        return compiler.get_ptxas().path  # triton 3.6


def compile_report(name: str, fn, signature: dict, constants: dict, num_warps: int,
                   num_stages: int) -> dict:
    """Compile fn for sm_90a; ptxas -v's registers, spills, and C7515 on its PTX."""
    sig = dict(signature) | {k: "constexpr" for k in constants}
    kernel = triton.compile(ASTSource(fn, sig, constants), target=TARGET,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas_path(), f"-arch={arch}", "-v", src, "-o",
                              os.path.join(d, "k.cubin")], capture_output=True, text=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"kernel": name, "triton": triton.__version__, "arch": arch, "ptxas_rc": out.returncode,
            "registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(spills),
            "shared_bytes": kernel.metadata.shared,
            "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
            "wgmma_serialized": "C7515" in log,
            "log": [line for line in log.splitlines() if "C7515" in line or "error" in line]}


def quant_cases() -> list[tuple]:
    """LLaMA-7B's qkv at M = 1 and 32, in float16 (the "asm" dequantisation) and bfloat16
    ("float"), both widths; launched as `quant_triton._quant_mm_tma` does, with PDL."""
    cases = []
    for bits in (4, 8):
        cfg = quant_tma_config(12288, 4096, bits)
        bn, bk = cfg["block_n"], cfg["block_k"]
        ks = triton.cdiv(4096 // bk, cfg["split"]) * bk
        steps = min(cfg["prefetch"], ks // bk)
        for dt, mode in (("fp16", 0), ("bf16", 2)):
            for m_tiles in (1, 2):
                sig = {"XD": f"tensordesc<{dt}[{BLOCK_M},{bk}]>",
                       "QD": f"tensordesc<i32[{bn},{bk * bits // 32}]>",
                       "SD": f"tensordesc<fp16[{bn},{bk // 32}]>",
                       "ZD": f"tensordesc<fp16[{bn},{bk // 32}]>", "Q": "*u8", "S": "*fp16",
                       "Z": "*fp16", "Y": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                       "stride_ym": "i32"}
                const = {"KS": ks, "BITS": bits, "BLOCK_M": BLOCK_M, "BLOCK_N": bn,
                         "BLOCK_K": bk, "SPLIT": cfg["split"], "M_TILES": m_tiles, "MODE": mode,
                         "PDL": True, "QLINES": launch.prefetch_lines(steps * bk * bits // 8),
                         "SLINES": launch.prefetch_lines(steps * bk // 16)}
                cases.append((f"quant int{bits} {dt} m_tiles={m_tiles}", _quant_tma_kernel, sig,
                              const, cfg["num_warps"], cfg["num_stages"]))
    return cases


def linear_cases() -> list[tuple]:
    """The float16 linear's TMA form as the step launches it: plain with the residual
    epilogue, and the folded forms (the norm; the norm and SiLU * up)."""
    cases = []
    for label, epilogue, res, rms, gated in (("residual", None, True, False, False),
                                             ("rms", "rms", False, True, False),
                                             ("rms+gated", "gated", False, True, True)):
        cfg = tma_config(epilogue)
        if epilogue:
            assert cfg["block_k"] == EPILOGUE_TILES[epilogue]["block_k"]
        bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
        sig = {"XD": f"tensordesc<fp16[{bm},{bk}]>", "WD": f"tensordesc<fp16[{bn},{bk}]>",
               "W": "*fp16", "B": "*fp16", "Y": "*fp16", "YR": "*fp16", "M": "i32", "N": "i32",
               "K": "i32", "NI": "i32", "sw_n": "i32", "sy_m": "i32", "syr_m": "i32",
               "eps": "fp32"}
        const = {"HAS_BIAS": False, "HAS_RES": res, "RMS": rms, "GATED": gated, "M_TILES": 2,
                 "PDL": True, "PREFETCH": cfg["prefetch"], "LINE": 64,
                 "STEPS": triton.cdiv(4096, bk), "BLOCK_M": bm,
                 "BLOCK_N": bn, "BLOCK_K": bk}
        cases.append((f"linear {label}", _linear_tma_kernel, sig, const, cfg["num_warps"],
                      cfg["num_stages"]))
    return cases


def attention_cases() -> list[tuple]:
    """The batch-invariant attention's split kernel (`row_attention`) in float16, head_dim 128
    (LLaMA) and 256 (GPT-J): a tile per token (tokens=1) and a prompt's tokens sharing it
    (multi-head: 16 tokens; GQA with groups of 4: 4); its persistent form; the paged kernel."""
    cases = []
    cfg = attention_config(1, 128)
    for group, tokens, dim in ((1, 1, 128), (1, 16, 128), (4, 4, 128), (1, 1, 256), (1, 16, 256)):
        sig = {n: "*fp16" for n in ("Q", "K", "V")} | {"Lens": "*i64", "OutPart": "*fp32",
                                                        "LsePart": "*fp32", "Slots": "*i64"}
        sig |= {n: "i32" for n in ("sq_b", "sq_h", "sk_s", "sk_h", "sk_l", "sv_s", "sv_h",
                                   "sv_l", "so_b", "so_h", "so_s", "sl_b", "sl_h", "split_len")}
        sig |= {"scale": "fp32"}
        block_n = attention_config(group, dim)["block_n"]
        const = {"D": dim, "G": group, "BLOCK_G": 16, "BLOCK_N": block_n, "BLOCK_D": dim,
                 "HAS_SLOTS": True, "PDL": True, "SKIP_EMPTY": True, "TOKENS": tokens}
        label = f"group={group} tokens={tokens}" + (" head_dim=256" if dim == 256 else "")
        cases.append((f"attention fp16 {label}", _split_kernel, sig, const, cfg["num_warps"],
                      cfg["num_stages"]))
        if dim == 256:  # GPT-J's heads: the grid form only
            continue
        # the persistent form: the same tile per item of the work list
        isig = {k: v for k, v in sig.items() if k not in ("Lens", "Slots")}
        isig |= {"Items": "*i32", "NumItems": "*i32"}
        iconst = {k: v for k, v in const.items() if k not in ("HAS_SLOTS", "SKIP_EMPTY")}
        cases.append((f"attention items fp16 {label}", _split_items_kernel,
                      isig, iconst, cfg["num_warps"], cfg["num_stages"]))
    # the paged layout's kernel (blocks of 16 positions), the same tile over a block table
    psig = {n: "*fp16" for n in ("Q", "K", "V")} | {"Tables": "*i64", "Lens": "*i64",
                                                     "OutPart": "*fp32", "LsePart": "*fp32"}
    psig |= {n: "i32" for n in ("sq_b", "sq_h", "sk_n", "sk_h", "sk_l", "sv_n", "sv_h", "sv_l",
                                "st_b", "width", "so_b", "so_h", "so_s", "sl_b", "sl_h")}
    psig |= {"scale": "fp32"}
    for group, tokens in ((1, 1), (1, 16)):
        const = {"D": 128, "G": group, "BLOCK_G": 16, "BS": 16, "MIN_SPLIT": MIN_SPLIT,
                 "MAX_SPLITS": MAX_SPLITS, "BLOCK_N": 64, "BLOCK_D": 128, "TOKENS": tokens}
        cases.append((f"attention paged fp16 group={group} tokens={tokens}", _paged_split_kernel,
                      psig, const, 4, 2))
    msig = {"OutPart": "*fp32", "LsePart": "*fp32", "Lens": "*i64", "Pos": "*i64",
            "Out": "*fp16"} | {n: "i32" for n in ("so_b", "so_h", "so_s", "sl_b", "sl_h",
                                                  "sout_b", "sout_h", "split_len", "num_splits")}
    cases.append(("attention merge", _ordered_combine_kernel, msig,
                  {"D": 128, "BLOCK_D": 128, "BLOCK_S": MERGE_SPLITS, "HAS_POS": True,
                   "PDL": True}, 4, 1))
    cases.append(("attention work list", _items_kernel,
                  {"Slots": "*i64", "Lens": "*i64", "Pos": "*i64", "Items": "*i32",
                   "NumItems": "*i32", "T": "i32", "split_len": "i32", "num_splits": "i32"},
                  {"TOKENS": 16, "HAS_POS": True, "BLOCK_T": 128, "BLOCK_S": 16, "PDL": True}, 4, 1))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON list on stdout")
    args = ap.parse_args()
    rows = [compile_report(*case)
            for case in quant_cases() + linear_cases() + attention_cases()]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"triton {triton.__version__}, ptxas {ptxas_path()}")
    for r in rows:
        print(f"{r['kernel']:32s} {r['arch']:7s} regs {r['registers']!s:>4} spills "
              f"{r['spill_bytes']:4d} B  shared {r['shared_bytes']:7d} B  wgmma {r['wgmma']:3d}  "
              f"serialised {r['wgmma_serialized']}")


if __name__ == "__main__":
    main()
