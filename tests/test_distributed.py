"""Tensor parallelism: two CPU processes over gloo give the tokens of one process.

Rank 0 runs the engine (arrivals mid-run, aborts, the memory shuffle); rank 1 only follows
the plans rank 0 broadcasts. Random presets drawn per shard equal slices of the whole.

The workers are spawned (torch.multiprocessing, `spawn`) rather than started by torchrun:
the same environment variables, but no launcher process importing torch too. Measured on the
2-core machine (loaded by other jobs), both models through two ranks: torchrun 14 s; spawn
11.5 s from a cold interpreter, of which about 5 s are the parent's imports, paid once by pytest.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from flover import ConfigError, Engine, EngineConfig, SamplingParams, distributed
from flover.distributed import check_launch, init_random_shard, shard_model
from flover.models.presets import _llama, preset
from flover.ops.attention import AttentionMetadata, PrefillChunk
from flover.weights import allocate

WORLD = 2
TIMEOUT = 120  # s; a hung collective fails the test instead of the whole run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# (iteration it arrives at, prompt, params): more requests than slots, staggered arrivals,
# one seeded sampled request among greedy ones
WORK = [(0, _prompt(5, 0), dict(max_tokens=9, temperature=0.0)),
        (0, _prompt(11, 1), dict(max_tokens=4, temperature=0.0)),
        (1, _prompt(3, 2), dict(max_tokens=12, temperature=0.8, top_p=0.9, seed=7)),
        (2, _prompt(8, 3), dict(max_tokens=6, temperature=0.0)),
        (4, _prompt(6, 4), dict(max_tokens=7, temperature=0.0)),
        (5, _prompt(4, 5), dict(max_tokens=20, temperature=0.0)),
        (6, _prompt(7, 6), dict(max_tokens=5, temperature=0.0))]
# (iteration, request): aborted before that iteration's step: r6 while it waits for a slot, r4
# while it decodes in slot 0 (the shuffle moves slot 2's row into it)
ABORTS = [(7, "r6"), (12, "r4")]


def _config(path: str, tp: int) -> EngineConfig:
    return EngineConfig(model=path, dtype="float32", device="cpu", max_concurrency=3,
                        max_seq_len=64, tensor_para_size=tp, use_mem_shuffle=True)


def prompt_logits(eng: Engine) -> torch.Tensor:
    """The first prompt's logits at every position: one forward, run by every rank alike."""
    ids = torch.tensor(WORK[0][1])
    n = len(ids)
    meta = AttentionMetadata(slot_ids=torch.zeros(n, dtype=torch.long), positions=torch.arange(n),
                             num_decode=0, decode_lengths=None, decode_max_len=0,
                             prefills=[PrefillChunk(0, 0, n, 0)])
    with torch.inference_mode():
        return eng.model.logits(eng.model(ids, meta, eng.cache.k, eng.cache.v)).clone()


def scenario(path: str, tp: int) -> dict:
    """Run WORK fused on an engine of 3 slots, with ABORTS: each request's tokens (None when
    aborted) and the iterations run. Under tensor parallelism rank 0 runs this, the others
    `follower()`."""
    eng = Engine(_config(path, tp))
    tokens, it, pending = {}, 0, list(enumerate(WORK))
    while pending or eng.has_unfinished():
        while pending and pending[0][1][0] <= it:
            i, (_, prompt, params) = pending.pop(0)
            eng.add_request(f"r{i}", prompt, SamplingParams(ignore_eos=True, **params))
        for when, rid in ABORTS:
            if when == it:
                eng.abort(rid)
                tokens[rid] = None
        for out in eng.step():
            if out.finished:
                tokens[out.request_id] = out.token_ids
        it += 1
    eng.close()
    return {"tokens": tokens, "logits": prompt_logits(eng), "kv_heads": eng.cache.k.shape[2],
            "iterations": eng.stats()["iterations"], "moves": eng.stats()["shuffle_moves"]}


def follower(path: str, tp: int) -> dict:
    eng = Engine(_config(path, tp))
    forwards = eng.follow()
    return {"forwards": forwards, "logits": prompt_logits(eng)}


def _worker(rank: int, port: int, paths: dict[str, str], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes share the two cores
    run = scenario if rank == 0 else follower
    results = {name: run(path, WORLD) for name, path in paths.items()}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    distributed.leave()


@pytest.fixture(scope="module")
def tp_results(llama_dir, gptj_dir, tmp_path_factory):
    """Both models through two gloo ranks, in one spawn: {rank: {model: scenario}}."""
    out = tmp_path_factory.mktemp("tp")
    paths = {"llama": str(llama_dir), "gptj": str(gptj_dir)}
    ctx = mp.start_processes(_worker, args=(_free_port(), paths, str(out)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"tensor-parallel workers did not finish in {TIMEOUT} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return {r: torch.load(out / f"rank{r}.pt") for r in range(WORLD)}


@pytest.fixture(scope="module")
def tp1_results(llama_dir, gptj_dir):
    return {"llama": scenario(str(llama_dir), 1), "gptj": scenario(str(gptj_dir), 1)}


@pytest.mark.parametrize("name", ["llama", "gptj"])
def test_tp2_through_rank_0s_plans_gives_tp1_tokens(tp_results, tp1_results, name):
    ref, lead, follow = tp1_results[name], tp_results[0][name], tp_results[1][name]
    assert sorted(ref["tokens"]) == [f"r{i}" for i in range(len(WORK))]
    assert ref["tokens"]["r4"] is ref["tokens"]["r6"] is None  # the scenario does what it says
    assert ref["moves"] > 0
    assert lead["tokens"] == ref["tokens"]
    assert lead["iterations"] == ref["iterations"]
    assert follow["forwards"] == lead["iterations"]  # one forward per plan, none of its own


@pytest.mark.parametrize("name", ["llama", "gptj"])
def test_tp2_logits_close_to_tp1_and_identical_across_ranks(tp_results, tp1_results, name):
    ref = tp1_results[name]
    got = [tp_results[r][name]["logits"] for r in range(WORLD)]
    torch.testing.assert_close(got[0], ref["logits"], atol=1e-4, rtol=1e-4)
    assert torch.equal(got[0], got[1])  # the all-reduce gives every rank the same bits


def test_each_rank_caches_its_share_of_the_kv_heads(tp_results):
    assert tp_results[0]["llama"]["kv_heads"] == 1  # GQA: 2 KV heads over 2 ranks
    assert tp_results[0]["gptj"]["kv_heads"] == 2  # 4 heads over 2 ranks


def test_heads_not_divisible_by_tp_is_a_clear_error(llama_dir):
    from flover.weights import hf_config

    model = allocate(hf_config(llama_dir), torch.float32, torch.device("meta"))  # 4 q, 2 kv heads
    with pytest.raises(ConfigError, match=r"tensor_para_size=3 .* 4 query heads, 2 KV heads"):
        shard_model(model, 0, 3)
    with pytest.raises(ConfigError, match=r"tensor_para_size=4 .*KV heads: 2 is not"):
        shard_model(model, 0, 4)


def test_shard_model_splits_heads_and_sets_the_per_rank_shape(llama_dir):
    from flover.weights import hf_config

    model = shard_model(allocate(hf_config(llama_dir), torch.float32, torch.device("meta")), 1, 2)
    attn = model.model.layers[0].self_attn
    assert (attn.h, attn.hkv) == (2, 1)
    assert attn.qkv_proj.weight.shape == ((2 + 1 + 1) * 16, 64)
    assert type(attn.o_proj).__name__ == "RowParallel" and attn.o_proj.weight.shape == (64, 32)
    assert model.cfg.num_kv_heads == 1 and model.full_cfg.num_kv_heads == 2


def test_tp_outside_torchrun_explains_how_to_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2 -m flover.cli"):
        Engine(EngineConfig(model="tiny_llama", device="cpu", tensor_para_size=2))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="WORLD_SIZE is 4"):
        check_launch(2)


def _whole_then_sliced(cfg, rank: int, world: int):
    whole = allocate(cfg, torch.float32, torch.device("cpu"))
    init_random_shard(whole, 3)
    return shard_model(whole, rank, world)


def _drawn_per_shard(cfg, rank: int, world: int):
    model = shard_model(allocate(cfg, torch.float32, torch.device("meta")), rank, world)
    model = model.to_empty(device=torch.device("cpu"))
    init_random_shard(model, 3, rank, world)
    return model


@pytest.mark.parametrize("cfg, world", [
    (preset("tiny_llama"), 2), (preset("tiny_gptj"), 2), (preset("tiny_gptj"), 4),
    # parts whose size 8 pieces do not divide (intermediate 100), and 8 pieces that 3 ranks
    # cannot share (6 heads): each rank draws the whole part and keeps its share
    (_llama(48, 100, 1, 6, kv_heads=6, vocab=64), 2), (_llama(48, 96, 1, 6, kv_heads=3, vocab=64), 3)])
def test_a_preset_drawn_per_shard_equals_the_slice_of_the_whole(cfg, world):
    for rank in range(world):
        want = _whole_then_sliced(cfg, rank, world).state_dict()
        got = _drawn_per_shard(cfg, rank, world).state_dict()
        assert want.keys() == got.keys()
        for name, t in want.items():
            assert torch.equal(got[name], t), (rank, name)
    first = dict(_drawn_per_shard(cfg, 0, world).named_parameters())
    second = dict(_drawn_per_shard(cfg, world - 1, world).named_parameters())
    name = next(n for n in first if "qkv_proj.weight" in n)
    assert not torch.equal(first[name], second[name])  # the shards hold different heads
