import ctypes, statistics, sys, torch
sys.path.insert(0, "bench")
from cpu_quant_layouts import SHAPES, bench, packed
from flover.ops import quant_cpu
from pathlib import Path
def load(src):
    so = quant_cpu.load(Path(src)); i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for f in (so.flover_int4_mm, so.flover_int8_mm):
        f.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ctypes.c_int, ctypes.c_int]; f.restype = None
    return so
# /tmp/prelut: quant_cpu.c of commit 2d42009 and its vec16.h
libs = {"before": load("/tmp/prelut/quant_cpu.c"), "lut": load("flover/ops/quant_cpu.c")}
torch.manual_seed(0)
for wide in (False, True):
  for m in (1, 8):
    for name, (n, k) in SHAPES.items():
        w, x = torch.randn(n, k) * 0.02, torch.randn(m, k)
        p = packed(w, 4, 32, torch.float32 if wide else torch.float16, True)
        outs, t = {}, {c: [] for c in libs}
        for _ in range(3):
            for c, so in libs.items():
                quant_cpu.lib = lambda so=so: so
                outs[c] = quant_cpu.int4_mm(x, p.qweight, p.scales, p.mins, 32)
                t[c].append(bench(lambda: quant_cpu.int4_mm(x, p.qweight, p.scales, p.mins, 32)))
        same = torch.equal(outs["before"].view(torch.int32), outs["lut"].view(torch.int32))
        print(f"{'f32' if wide else 'f16'} {name:>8} M={m}: before {statistics.median(t['before']):8.1f} us, lut {statistics.median(t['lut']):8.1f} us, same bits {same}")
