"""The products' Hopper TMA forms compiled for sm_90a here, without a GPU (bench/sm90_codegen.py):
ptxas must not serialise their warpgroup MMAs (its info C7515), which the int8 / int4 kernel's
K loop did until its part's length became a constexpr (and, under the GPU machines' triton 3.6,
the float16 linear's folded forms until their trip count did). Compiled apart from this process,
which runs Triton in its interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ptxas_available() -> bool:
    try:
        import triton

        return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin").is_dir()
    except ImportError:
        return False


@pytest.mark.skipif(not _ptxas_available(), reason="triton's ptxas is not installed")
def test_tma_products_compile_for_sm90_with_their_wgmmas_pipelined():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(ROOT), "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "sm90_codegen.py"), "--json"],
                         capture_output=True, text=True, env=env, timeout=600, check=True)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    names = {r["kernel"] for r in rows}
    assert {"quant int4 fp16 m_tiles=1", "quant int8 bf16 m_tiles=2", "linear rms+gated",
            "attention fp16 group=1 tokens=16", "attention items fp16 group=1 tokens=16",
            "attention work list"} <= names
    for r in rows:
        assert r["ptxas_rc"] == 0 and r["arch"] == "sm_90a", r
        assert not r["wgmma_serialized"], r
        if not r["kernel"].startswith("attention"):  # attention's 16-row tiles: mma.sync
            assert r["wgmma"] > 0, r
    # the float16 forms (the shipped decode path; attention's tile per token and a prompt's
    # tokens sharing it) keep every value in registers; not checked: the bf16 products,
    # attention's persistent form (off; 8 bytes spilled with groups of 4 under triton 3.9) and
    # the paged layout's kernel (it spilled before 2026-12-08 too: docs/PERF.md)
    shipped = [r for r in rows if not any(w in r["kernel"] for w in ("bf16", "items", "paged"))]
    assert all(r["spill_bytes"] == 0 for r in shipped), rows
