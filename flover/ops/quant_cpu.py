"""The CPU kernels of weight-only int4/int8 (quant_cpu.c), compiled once and called via ctypes.

Why not PyTorch's own: `torch._weight_int8pack_mm` (per-channel scales only) and
`torch._weight_int4pack_mm_for_cpu` (groups of 32..256) exist, but on the 2-core AVX-512 CPU
we measure on they run 4-100x slower than the float32 oneDNN path at M=1 and M=8
(docs/PERF.md, "Weight-only int8 / int4"), so quantizing through them would make decoding
slower, not faster. The C file is ~180 lines of GCC vector code that the compiler turns into
the host's instructions (-O3 -march=native); it is built with the system C compiler into the
flover cache, keyed by its source, the compiler flags and the CPU (`build` and `load` serve
fused_cpu.c too). Without a compiler, `lib()` is None and QuantLinear uses its PyTorch
reference instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("quant_cpu.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
log = logging.getLogger(__name__)


def _cache_dir() -> Path:
    return Path(os.environ.get("FLOVER_CACHE", Path.home() / ".cache" / "flover")) / "kernels"


def _cpu_key() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def build(source: Path = SOURCE) -> Path | None:
    """The compiled library of `source` (a C file beside this one), compiling it if needed;
    None without a working compiler."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    # the source and the files beside it that it may include (vec16.h; layer_cpu.c includes
    # the other two C files)
    src = source.read_bytes() + b"".join(f.read_bytes() for f in sorted(source.parent.glob("*.[ch]")))
    key = hashlib.sha256(src + " ".join(FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    out = _cache_dir() / f"{source.stem}-{key}.so"
    if out.is_file():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([cc, *FLAGS, str(source), "-o", str(tmp), "-lm"], check=True,
                       capture_output=True, timeout=120)
        tmp.replace(out)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("flover: cannot compile %s (%s); using the slower PyTorch reference",
                    source.name, e)
        tmp.unlink(missing_ok=True)
        return None
    return out


def load(source: Path) -> ctypes.CDLL | None:
    """`source` compiled and loaded, or None (no compiler, or a library that does not load)."""
    path = build(source)
    if path is None:
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:  # e.g. a cache shared with a machine of another CPU
        log.warning("flover: cannot load %s (%s); using the slower PyTorch reference", path, e)
        return None


def bind(so: ctypes.CDLL) -> ctypes.CDLL:
    """The library (a build of quant_cpu.c, this one's or another's) with its functions'
    argument types set."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for f in (so.flover_int4_mm, so.flover_int8_mm):
        f.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ctypes.c_int, ctypes.c_int]
        f.restype = None
    return so


@cache
def lib() -> ctypes.CDLL | None:
    """The kernels, or None (no compiler, or FLOVER_NO_QUANT_KERNEL set)."""
    if os.environ.get("FLOVER_NO_QUANT_KERNEL"):
        return None
    so = load(SOURCE)
    return None if so is None else bind(so)


def _wide(scales: torch.Tensor, mins: torch.Tensor | None) -> int:
    """1 for float32 scales (and mins), 0 for float16; nothing else reaches the kernels."""
    dtypes = {scales.dtype} | ({mins.dtype} if mins is not None else set())
    if dtypes not in ({torch.float16}, {torch.float32}):
        raise TypeError(f"scales and mins must be both float16 or both float32, not {dtypes}")
    return int(scales.dtype == torch.float32)


def int4_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
            group: int) -> torch.Tensor:
    """x [M, K] float32 contiguous; qweight [N, K/2] uint8; scales, mins [N, K/group] float16
    or float32; group 32 << k."""
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib().flover_int4_mm(x.data_ptr(), m, k, qweight.data_ptr(), scales.data_ptr(),
                         mins.data_ptr(), n, group, y.data_ptr(), torch.get_num_threads(),
                         _wide(scales, mins))
    return y


def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group: int,
            mins: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 contiguous; qweight [N, K] int8; scales (and mins, if any)
    [N, K/group] float16 or float32; group 16 << k."""
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib().flover_int8_mm(x.data_ptr(), m, k, qweight.data_ptr(), scales.data_ptr(),
                         None if mins is None else mins.data_ptr(), n, group, y.data_ptr(),
                         torch.get_num_threads(), _wide(scales, mins))
    return y
