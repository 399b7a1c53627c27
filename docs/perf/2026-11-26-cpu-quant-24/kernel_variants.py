"""Alternate C kernel variants in one process (30 layers of the embedded model's int4 shapes and its
Q8_0-shaped head, random weights; min of 5 rounds):
    python kernel_variants.py THREADS old_quant_cpu.c new_quant_cpu.c"""
import sys, time, ctypes, torch
from pathlib import Path
from flover.ops import quant, quant_cpu
torch.set_num_threads(int(sys.argv[1]))
libs = []
for f in sys.argv[2:]:
    so = quant_cpu.load(Path(f))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    so.flover_int4_mm.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    so.flover_int8_mm.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    libs.append(so)
SH = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
torch.manual_seed(0)
mats = [quant.quantize(torch.randn(n, k) * 0.02, 4) for _ in range(30) for (n, k) in SH]
head = quant.quantize(torch.randn(49152, 576) * 0.02, 8)
res = {}
for rnd in range(5):
    for m in (1, 8):
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        for i, so in enumerate(libs):
            quant_cpu.lib = lambda so=so: so
            t = time.perf_counter()
            for p in mats:
                quant_cpu.int4_mm(xs[p.qweight.shape[1] * 2], p.qweight, p.scales, p.mins, 32)
            t1 = time.perf_counter()
            quant_cpu.int8_mm(xs[576], head.qweight, head.scales, 32)
            t2 = time.perf_counter()
            res.setdefault((m, i), []).append((t1 - t, t2 - t1))
for (m, i), v in sorted(res.items()):
    print(f"M={m} {Path(sys.argv[2 + i]).name:>20}: layers min {min(a for a, _ in v)*1e3:6.2f} ms, head min {min(b for _, b in v)*1e3:6.2f} ms")
