"""Tensor parallelism over torch.distributed (the original's `tensor_para_size`).

Megatron's split of every transformer layer across the `world` ranks of one group:
- attention: rank r holds query heads [r*h/w, (r+1)*h/w) and KV heads [r*hkv/w, ...) of the
  stacked qkv_proj (column-parallel) and the matching input columns of o_proj / out_proj
  (row-parallel), so attention and the KV cache stay local: each rank caches hkv/w heads;
- MLP: gate/up (GPT-J: fc_in) column-parallel, down (fc_out) row-parallel;
- a row-parallel layer's partial products are summed by one all_reduce, then its bias is
  added once; two all-reduces per layer in all;
- embeddings, norms and the LM head are replicated (0.26 GB of LLaMA-7B's 13.5 GB in fp16).

Rank 0 owns the engine: its scheduler, its clock, its requests, the sampling. Before each
forward it broadcasts what that forward consumes (`flover.engine.plan.ForwardPlan`: input
ids, attention metadata, cache operations) over a gloo group (`PlanChannel`); the other ranks
run `Engine.follow()`, which executes each plan's forward and nothing else, until rank 0's
`Engine.close()`. A rank that dies ends the run everywhere within seconds: every rank beats a
heartbeat in torchrun's store and a watchdog thread ends its process when a peer falls silent
(`Heartbeat`), so no rank waits forever in a collective (NCCL's included) for a dead peer.

The model code knows nothing of ranks: `shard_model` slices the parameters in place, swaps
the row-parallel Linear modules for `RowParallel` (which adds the all_reduce), sets each
attention module's head counts, and replaces `model.cfg` with the per-rank shape
(num_heads / w, num_kv_heads / w, intermediate_size / w), which is what the engine sizes
the KV cache from. `load_sharded` slices checkpoint tensors while loading (peak memory: the
shard plus one full tensor); presets are initialised whole, then sliced, so their random
weights equal the unsharded model's.

Launch: `torchrun --nproc-per-node k -m flover.cli generate --tensor-para-size k ...`.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flover import weights
from flover.config import ConfigError
from flover.models import ModelConfig, ModelFormatError
from flover.models.layers import load_named_weights
from flover.models.presets import PRESETS, preset
from flover.tokenizer import Tokenizer

COLUMN = ("qkv_proj", "gate_up_proj", "fc_in")  # output rows split across ranks
ROW = ("o_proj", "out_proj", "down_proj", "fc_out")  # input columns split; all_reduce after
_HF_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc_in")  # checkpoint names


@dataclass(slots=True)
class Group:
    rank: int
    world: int
    device: torch.device
    control: object | None = None  # a gloo group for small host-side agreements
    plans: object | None = None  # a gloo group for rank 0's plans (no timeout: see PlanChannel)
    heartbeat: Heartbeat | None = None


_GROUP: Group | None = None


def launch_hint(k: int) -> str:
    return (f"start {k} processes with torchrun, e.g. `torchrun --nproc-per-node {k} -m "
            f"flover.cli generate --tensor-para-size {k} ...` or `torchrun --nproc-per-node {k} "
            f"-m flover.cli run CONFIG.ini --set model_specification.tensor_para_size={k}`")


def check_launch(tensor_para_size: int) -> None:
    """ConfigError unless this process was started by torchrun with WORLD_SIZE == k."""
    world = os.environ.get("WORLD_SIZE")
    if tensor_para_size > 1 and world != str(tensor_para_size):
        got = "not set (not started by torchrun)" if world is None else world
        raise ConfigError(f"tensor_para_size={tensor_para_size} is invalid here: WORLD_SIZE is "
                          f"{got}; {launch_hint(tensor_para_size)}")


def init_distributed(device: str | torch.device = "auto") -> Group:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    NCCL on GPUs (device cuda:LOCAL_RANK), gloo on the CPU. Idempotent.
    """
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except KeyError as e:
        raise ConfigError(f"tensor parallelism needs torchrun's environment ({e.args[0]} is not "
                          f"set): {launch_hint(2)}") from None
    kind = torch.device(device).type if str(device) != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs "
                              "are visible: start at most one process per GPU")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif kind == "cpu":
        dev = torch.device("cpu")
    else:
        raise ConfigError(f"device={device!r} is invalid with tensor parallelism: "
                          "expected cuda or cpu")
    if kind == "cuda":  # NVLink multicast off: it can take a shared host's GPUs out of service
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=rank,
                                world_size=world, device_id=dev if kind == "cuda" else None)
        atexit.register(_close)
    control = dist.new_group(backend="gloo") if kind == "cuda" else None
    # waiting for rank 0's next plan lasts as long as a server stays idle: no timeout there;
    # the heartbeat, not a collective's timeout, finds a dead rank
    plans = dist.new_group(backend="gloo", timeout=PLAN_WAIT)
    beat = Heartbeat(rank, world).start() if world > 1 else None
    _GROUP = Group(rank, world, dev, control, plans, beat)
    return _GROUP


def _close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 without a process group): only rank 0 prints."""
    return _GROUP.rank if _GROUP is not None else 0


def leave() -> None:
    """Say that this rank's work ended well: the others' watchdogs let it go quietly. Call it
    last, on success only (a rank that exits without it counts as dead). Then wait for every
    rank to leave, so that all tear the process groups down together: a rank that destroys
    its gloo groups while a peer still holds them open sometimes aborts in C++ ("terminate
    called without an active exception"); a follower is done long before rank 0 is."""
    if _GROUP is not None and _GROUP.heartbeat is not None:
        _GROUP.heartbeat.leave()
        try:
            dist.barrier(group=_GROUP.plans)
        except Exception:  # noqa: BLE001 - a peer died after its work: nothing left to share
            pass


# --- rank 0's plans --------------------------------------------------------------------------

PLAN_WAIT = timedelta(days=365)  # an idle server: followers wait this long for a plan


class PlanChannel:
    """Rank 0 sends one small picklable record per forward; the other ranks receive it.

    One `broadcast_object_list` over the gloo plan group (host memory, even when the model's
    all-reduces use NCCL). `None` is the end of the engine's run."""

    def __init__(self, group: Group) -> None:
        self.group = group

    @property
    def leader(self) -> bool:
        return self.group.rank == 0

    def send(self, record: object) -> None:
        assert self.leader, "only rank 0 sends plans"
        dist.broadcast_object_list([record], src=0, group=self.group.plans)

    def recv(self) -> object:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group.plans)
        return box[0]


# --- a dead rank ends the run -----------------------------------------------------------------

HEARTBEAT_INTERVAL = 0.5  # s
HEARTBEAT_TIMEOUT = float(os.environ.get("FLOVER_TP_HEARTBEAT_TIMEOUT", "10"))  # s of silence


class Heartbeat:
    """Every rank adds 1 to its counter in torchrun's store every HEARTBEAT_INTERVAL and
    watches the others' counters: a peer whose counter has not moved for HEARTBEAT_TIMEOUT
    seconds (killed, hung, its node gone), or a store that no longer answers, ends this process
    with a message naming the rank (exit status 1). A peer that called `leave()` is let go.

    It runs on its own thread with its own store connection, so it fires wherever the main
    thread waits: in a gloo broadcast, in an NCCL all-reduce, inside a CUDA graph."""

    def __init__(self, rank: int, world: int, timeout: float = HEARTBEAT_TIMEOUT) -> None:
        self.rank, self.world, self.timeout = rank, world, timeout
        self.store = dist.PrefixStore("flover/heartbeat/", dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=timedelta(seconds=max(timeout, 5.0)), wait_for_workers=False))
        self._left = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name="flover-heartbeat", daemon=True)
        self._thread.start()
        return self

    def leave(self) -> None:
        """Stop beating, tell the others, and close the store connection: the thread must not
        be inside a store call when the interpreter exits (C++ aborts the process then)."""
        if self._left.is_set():
            return
        try:
            self.store.set(f"left/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - the others are gone already: nothing to tell
            pass
        self._left.set()
        self._thread.join(self.timeout)
        self.store = None

    def _run(self) -> None:
        peers = [r for r in range(self.world) if r != self.rank]
        seen = {r: (-1, time.monotonic()) for r in peers}  # last count, when it last moved
        gone: set[int] = set()  # peers that left well
        while not self._left.wait(HEARTBEAT_INTERVAL):
            try:
                self.store.add(f"beat/{self.rank}", 1)
                now = time.monotonic()
                for r in peers:
                    if r in gone or self.store.check([f"left/{r}"]):
                        gone.add(r)
                        continue
                    count = self.store.add(f"beat/{r}", 0)
                    if count != seen[r][0]:
                        seen[r] = (count, now)
                    elif now - seen[r][1] > self.timeout:
                        self._end(f"rank {r} has stopped answering (no heartbeat for "
                                  f"{self.timeout:g} s): it died or hung")
            except Exception as e:  # noqa: BLE001 - the store's host is gone
                # rank 0 (whose process or launcher may host the store) ended the run well, or
                # this rank is about to leave too (its work is done, the host went first)
                if 0 in gone or self._left.wait(self.timeout):
                    return
                self._end(f"lost the rendezvous store at {os.environ.get('MASTER_ADDR')}:"
                          f"{os.environ.get('MASTER_PORT')} ({type(e).__name__}: {e}); the rank "
                          "or node hosting it has died")

    def _end(self, why: str) -> None:
        if not self._left.is_set():
            end_run(why)


def end_run(why: str) -> None:
    """End this rank now, with a message (exit status 1): its peers' heartbeats or broken
    connections end them in turn. For states no rank can recover from."""
    print(f"flover: error: tensor parallelism: {why}; ending rank {rank()}",
          file=sys.stderr, flush=True)
    os._exit(1)  # the main thread may be blocked in a collective that never returns


# --- the split ---------------------------------------------------------------------------

class RowParallel(nn.Module):
    """A Linear whose input features are split across ranks: partial x @ W_r^T, summed by
    all_reduce, then the (unsplit) bias once. Parameter names stay `weight` and `bias`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def shard_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The per-rank shape; ConfigError when the heads or the MLP do not divide evenly."""
    for what, n in (("query heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % world:
            raise ConfigError(
                f"tensor_para_size={world} is invalid for this model: it has {cfg.num_heads} "
                f"query heads, {cfg.num_kv_heads} KV heads and intermediate_size="
                f"{cfg.intermediate_size}; each must be divisible by tensor_para_size "
                f"({what}: {n} is not)")
    return replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=cfg.num_kv_heads // world,
                   intermediate_size=cfg.intermediate_size // world)


def _take(t: torch.Tensor, sizes: list[int], dim: int, rank: int, world: int) -> torch.Tensor:
    """Rank r's 1/world of each consecutive part (of `sizes`) of t along dim, concatenated."""
    parts, start = [], 0
    for s in sizes:
        n = s // world
        parts.append(t.narrow(dim, start + rank * n, n))
        start += s
    return torch.cat(parts, dim).contiguous() if len(parts) > 1 else parts[0].contiguous()


def _column_sizes(attr: str, cfg: ModelConfig) -> list[int]:
    if attr == "qkv_proj":  # [q heads | k heads | v heads]; GPT-J's view(t, 3, h, d) too
        return [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
    if attr == "gate_up_proj":
        return [cfg.intermediate_size] * 2
    return [cfg.intermediate_size]  # fc_in


def is_sharded(model: nn.Module) -> int:
    """The world a model was sharded for (1: not sharded)."""
    return getattr(model, "tp_world", 1)


@torch.no_grad()
def _linear(mod: nn.Module, attr: str) -> nn.Linear | None:
    """The plain linear layer `mod.attr` to shard, or None when `mod` has no such layer."""
    lin = getattr(mod, attr, None)
    if lin is not None and not isinstance(lin, nn.Linear):
        raise TypeError(f"cannot shard {type(lin).__name__} {attr}: shard before "
                        "packing or converting the linear layers")
    return lin


def shard_model(model: nn.Module, rank: int, world: int, group=None) -> nn.Module:
    """Rewrite a whole model into rank `rank`'s shard of `world`, in place; returns it.

    Works on any device, `meta` included. Memory: the full model first, then the shard
    (each full layer is freed as its slice replaces it); use `load_sharded` to avoid that.
    """
    if is_sharded(model) == world:
        if getattr(model, "tp_rank", rank) != rank:
            raise ValueError(f"model is rank {model.tp_rank}'s shard, not rank {rank}'s")
        return model
    if is_sharded(model) != 1:
        raise ValueError(f"model is already sharded for tensor_para_size={is_sharded(model)}")
    full = model.cfg
    per_rank = shard_config(full, world)
    for mod in list(model.modules()):
        for attr in COLUMN:
            lin = _linear(mod, attr)
            if lin is None:
                continue
            sizes = _column_sizes(attr, full)
            lin.weight = nn.Parameter(_take(lin.weight, sizes, 0, rank, world), requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(_take(lin.bias, sizes, 0, rank, world), requires_grad=False)
            lin.out_features = lin.weight.shape[0]
        for attr in ROW:
            lin = _linear(mod, attr)
            if lin is None:
                continue
            w = _take(lin.weight, [lin.in_features], 1, rank, world)
            setattr(mod, attr, RowParallel(w, lin.bias, group))
        if hasattr(mod, "qkv_proj") and hasattr(mod, "h"):  # an attention module
            mod.h //= world
            if hasattr(mod, "hkv"):
                mod.hkv //= world
    for mod in model.modules():
        if getattr(mod, "cfg", None) is full:
            mod.cfg = per_rank
    model.tp_rank, model.tp_world, model.full_cfg = rank, world, full
    return model


# --- random weights drawn per shard ---------------------------------------------------------

PIECES = 8  # each part of a split parameter is drawn as 8 pieces, each from its own seed


@torch.no_grad()
def init_random_shard(model: nn.Module, seed: int, rank: int = 0, world: int = 1,
                      std: float = 0.02) -> None:
    """Fill a preset's parameters (rank `rank`'s shard of `world`, or the whole model with the
    defaults) with random weights, drawing only this rank's share: presets start in seconds
    at any size, and every shard equals the slice of the whole model drawn by this function
    (world 1). That whole model is not the single-process preset, which `init_random` draws
    as one stream (kept, so that tp=1's random weights and the tests on them do not change):
    compare tp=k's tokens against a tp=1 engine over `init_random_shard`'s model.

    Each split part of a parameter (q, k, v of qkv_proj; gate, up; a row-parallel weight's
    input columns) is drawn as PIECES pieces along its split dimension, piece q from a
    generator seeded by (seed, parameter name, part, q); a rank draws the pieces of its share
    (when `world` divides PIECES and the part's size, else the whole part, then keeps its
    share). Replicated parameters are drawn whole. Norm weights are 1, biases 0."""
    full = getattr(model, "full_cfg", model.cfg)
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith("ln_1.weight") or name.endswith("ln_f.weight"):
            p.fill_(1.0)
            continue
        if name.endswith("bias"):
            p.zero_()
            continue
        layer = name.split(".")[-2] if "." in name else ""
        if layer in COLUMN:
            dim, sizes = 0, _column_sizes(layer, full)
        elif layer in ROW:
            dim, sizes = 1, [p.shape[1] * world]
        else:  # replicated: every rank draws it whole
            _draw_part(p, 0, p.shape[0], seed, name, 0, 0, 1, std)
            continue
        at = 0
        for j, size in enumerate(sizes):
            view = p.narrow(dim, at, size // world)
            _draw_part(view, dim, size, seed, name, j, rank, world, std)
            at += size // world


def _draw_part(out: torch.Tensor, dim: int, size: int, seed: int, name: str, part: int,
               rank: int, world: int, std: float) -> None:
    """`out` <- rank's share (along dim) of a part of `size` drawn as pieces."""
    pieces = PIECES if size % PIECES == 0 else 1
    per = size // pieces
    if pieces % world == 0:  # the share is whole pieces: draw those only
        k = pieces // world
        for i, q in enumerate(range(rank * k, (rank + 1) * k)):
            out.narrow(dim, i * per, per).copy_(_piece(out, dim, per, seed, name, part, q, std))
        return
    whole = torch.cat([_piece(out, dim, per, seed, name, part, q, std) for q in range(pieces)], dim)
    out.copy_(whole.narrow(dim, rank * (size // world), size // world))


def _piece(like: torch.Tensor, dim: int, length: int, seed: int, name: str, part: int, q: int,
           std: float) -> torch.Tensor:
    """One piece, drawn contiguous (its values do not depend on where it is stored)."""
    shape = list(like.shape)
    shape[dim] = length
    key = (seed * 1_000_003 + zlib.crc32(name.encode()) * 1_009 + part * 101 + q) % (1 << 62)
    gen = torch.Generator(device=like.device).manual_seed(key)
    return torch.empty(shape, dtype=like.dtype, device=like.device).normal_(0.0, std, generator=gen)


# --- loading straight into the shard -------------------------------------------------------

def shard_tensors(tensors: Iterator[tuple[str, torch.Tensor]], rank: int,
                  world: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Hugging Face checkpoint tensors -> this rank's slices, by name."""
    for name, t in tensors:
        parts = name.split(".")
        layer, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", "")
        if layer in _HF_COLUMN:
            t = _take(t, [t.shape[0]], 0, rank, world)
        elif layer in ROW and kind == "weight":
            t = _take(t, [t.shape[1]], 1, rank, world)
        yield name, t


def _stacking(cfg: ModelConfig) -> tuple[dict, dict]:
    """The stacked parameters of each family at this (per-rank) shape, as its load_weights."""
    q, kv, i = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    stacked = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}
    sizes = {"qkv_proj": [q, kv, kv]}
    if cfg.arch == "llama":
        stacked |= {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
        sizes["gate_up_proj"] = [i, i]
    return stacked, sizes


def load_sharded(spec: str | None, dtype: torch.dtype, group: Group,
                 seed: int = 0) -> tuple[nn.Module, object | None]:
    """`flover.weights.load_model` for one rank: its shard and the tokenizer."""
    r, w, dev = group.rank, group.world, group.device
    if spec in PRESETS:  # random weights: each rank draws its own shard only
        model = shard_model(weights.allocate(preset(spec), dtype, torch.device("meta")), r, w)
        model = model.to_empty(device=dev)
        for m in model.modules():
            if hasattr(m, "reset_buffers"):
                m.reset_buffers()
        init_random_shard(model, seed, r, w)
        return model, None
    if spec is None or spec == weights.DEFAULT_MODEL:
        spec = str(weights.default_model_path())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        path = weights.convert_gguf(path)
    if not path.is_dir():
        preset(spec)  # raises the 'unknown model' error listing what is accepted
        raise ModelFormatError(f"{spec} is not a model")
    cfg = weights.hf_config(path)
    model = shard_model(weights.allocate(cfg, dtype, torch.device("meta")), r, w)
    model = model.to_empty(device=dev)
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()
    tensors = shard_tensors(weights.hf_tensors(path), r, w)
    if cfg.tie_word_embeddings:
        tensors = ((n, t) for n, t in tensors if n != "lm_head.weight")
    load_named_weights(model, tensors, *_stacking(model.cfg))
    return model, Tokenizer.from_hf_dir(path, cfg)
