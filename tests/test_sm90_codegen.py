"""The products' Hopper TMA forms compiled for sm_90a here, without a GPU (bench/sm90_codegen.py):
ptxas must not serialise their warpgroup MMAs (its info C7515), which the int8 / int4 kernel's
K loop did until its part's length became a constexpr (and, under the GPU machines' triton 3.6,
the float16 linear's folded forms until their trip count did). Compiled apart from this process,
which runs Triton in its interpreter. Twice: with the installed triton (CI's) and with the
GPU machines' (3.6, which the Makefile puts beside the venv), whose ptxas differs."""

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


# the GPU machines' triton (3.6), installed beside the venv's by the Makefile
GPU_TRITON = ROOT / ".venv" / "triton-gpu"


@pytest.mark.skipif(not _ptxas_available(), reason="triton's ptxas is not installed")
@pytest.mark.parametrize("triton_path", ["installed", "gpu-machines"])
def test_tma_products_compile_for_sm90_with_their_wgmmas_pipelined(triton_path):
    if triton_path == "gpu-machines" and not (GPU_TRITON / "triton").is_dir():
        pytest.skip("the GPU machines' triton is not beside the venv (make installs it)")
    path = [str(GPU_TRITON)] if triton_path == "gpu-machines" else []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": os.pathsep.join(path + [str(ROOT)]), "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "sm90_codegen.py"), "--json"],
                         capture_output=True, text=True, env=env, timeout=600, check=True)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    names = {r["kernel"] for r in rows}
    assert {"quant int4 fp16 m_tiles=1", "quant int8 bf16 m_tiles=2", "linear rms+gated",
            "attention fp16 group=1 tokens=16", "attention items fp16 group=1 tokens=16",
            "attention merge", "attention work list"} <= names
    if triton_path == "gpu-machines":
        assert {r["triton"] for r in rows} == {"3.6.0"}
    for r in rows:
        assert r["ptxas_rc"] == 0 and r["arch"] == "sm_90a", r
        assert not r["wgmma_serialized"], r
        if not r["kernel"].startswith("attention"):  # attention's 16-row tiles: mma.sync
            assert r["wgmma"] > 0, r
    # the float16 forms (the shipped decode path; attention's tile per token and a prompt's
    # tokens sharing it) keep every value in registers; not checked: the bf16 products,
    # attention's persistent form (off; 8 bytes spilled with groups of 4 under triton 3.9),
    # GPT-J's head_dim 256 (24 bytes under 3.6 before 2026-12-08, 88 with the shared tile)
    # and the paged layout's kernel (it spilled before 2026-12-08 too): docs/PERF.md
    unchecked = ("bf16", "items", "paged", "head_dim=256")
    shipped = [r for r in rows if not any(w in r["kernel"] for w in unchecked)]
    assert all(r["spill_bytes"] == 0 for r in shipped), rows
