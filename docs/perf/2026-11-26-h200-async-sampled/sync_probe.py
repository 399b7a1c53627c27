import sys, traceback, torch
sys.path.insert(0, "tests")
from test_engine import finals
from test_engine_gpu import WORK
from flover import Engine, EngineConfig, SamplingParams
seen = set()
for layout in ("slots", "pages"):
    extra = {"kv_layout": "pages", "block_size": 16} if layout == "pages" else {}
    eng = Engine(EngineConfig(model="tiny_llama", dtype="float16", device="cuda", max_concurrency=8,
                              max_seq_len=128, prefill_token_budget=8, async_scheduling=True, **extra))
    real = eng.runner.launch
    def launch(batch, prev=None):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(batch, prev)
        except RuntimeError:
            tb = traceback.format_exc()
            key = tb.strip().splitlines()[-3]
            if key not in seen:
                seen.add(key); print(layout, "----\n", "\n".join(tb.splitlines()[-14:]))
            torch.cuda.set_sync_debug_mode("default")
            return real(batch, prev)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    eng.runner.launch = launch
    sampled = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=1, logit_bias={5: 2.0}, min_tokens=3)
    finals(eng, WORK + [(1, [30, 31, 32, 33], sampled), (4, list(range(40, 60)), sampled)])
print("distinct sync sites:", len(seen))
