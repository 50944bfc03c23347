"""Data-parallel elastic training over plain `torchrun`: the only module that creates process groups.

## Launching

One machine, 8 GPUs (FSDP2, the default on GPU):

    torchrun --standalone --nproc-per-node 8 -m elasticmoe train --config small-gpu --out runs/gpu

The console script works the same way: `torchrun --standalone --nproc-per-node 8 --no-python
elasticmoe train ...`. Several machines: run the same command on every node, naming one node's
address as the rendezvous endpoint (torchrun's c10d rendezvous; nothing home-made):

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29500 \\
        --rdzv-id my-run -m elasticmoe train --config small-gpu --out /shared/runs/gpu

The run folder must be on a file system every node sees: rank 0 prepares the data and writes
metrics, ledger and the final `parent/`; every rank writes its own checkpoint shards.

On CPU (gloo), e.g. to try a recipe or in CI (one thread per process on a small machine):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m elasticmoe train --config micro --out runs/cpu2

Add `--resume` to continue from the newest valid checkpoint, at the same or at another world size
(a plain `python -m elasticmoe train --resume` included). `train.batch_size` is the GLOBAL batch:
each rank takes batch_size / world_size rows (an error if that does not divide), so the batch,
the learning-rate schedule and the sampled sub-networks do not depend on the number of processes.

## FSDP2 or DDP: `--parallel {auto,fsdp,ddp}`

* `fsdp` (FSDP2 `fully_shard` on every Block and on the root; the default on GPU): parameters,
  gradients and AdamW state are sharded (expert tensors along the experts dimension), so each
  device holds about 1/N of the 16 bytes/parameter of fp32 weights + grads + Adam moments, plus
  one unsharded block at a time. It costs an all-gather per kept block in every forward and
  backward and a reduce-scatter per kept block per sub-network backward. Pick it when the model
  and its optimizer do not fit comfortably on one device, or whenever unsure on GPUs.
* `ddp` (replicated; the default on CPU): every rank holds everything; one all-reduce of all
  gradients per step, however many sub-networks the step trains. Pick it when model + gradients +
  AdamW + activations fit on one device: it communicates less (2x the gradient bytes per step
  instead of ~3x the parameter bytes per sub-network) and is faster on slow interconnects and CPUs.

## How gradients are synchronised when one step trains several sub-networks

Each step runs the sandwich's sub-networks one after another, back-propagating each at once
(gradient accumulation), and a sub-network may drop layers and experts, so some parameters get
no gradient in some backward passes. Every rank samples the same sub-networks (sampling derives
from (seed, step)); `agree_on_subnets` checks it each step with an all-gather of a hash, and stops
with an error naming both sides instead of letting mismatched collectives hang.

* ddp: torch's DistributedDataParallel reducer is made for one backward per forward over a fixed
  set of used parameters; with several partial backward passes per step it needs
  find_unused_parameters (a graph walk per forward) and `no_sync` for all but the last backward,
  and a parameter used by an earlier sub-network but not by the last one is then easy to get
  wrong. We skip the reducer: after the last backward, `sync_grads` all-reduces every gradient
  once (flat buckets; a missing gradient counts as zeros, and a parameter that has no gradient on
  any rank keeps none, exactly as in one process, so AdamW skips it there too).
  Cost: no overlap of that all-reduce with the backward pass.
* fsdp: FSDP2 reduce-scatters a block's gradient in the post-backward of every backward pass the
  block took part in; blocks dropped by a sub-network never ran their forward, so no rank issues
  a collective for them, and the sharded gradients accumulate across sub-networks. We leave
  gradient sync on for every backward rather than `set_requires_gradient_sync(False)`: with it
  off, a block used by an earlier sub-network but dropped by the last would keep an unreduced
  unsharded gradient (FSDP2 reduces in the post-backward of blocks that ran), and the unsharded
  accumulation would cost the memory FSDP saves.

A non-finite loss on any rank is agreed on with an all-reduce before its backward pass, so all
ranks skip the step (or stop) together; the gradient norm for clipping is global (all-reduced).
Losses written to metrics.jsonl are means over ranks, i.e. over the global batch. The
load-balance auxiliary loss is computed per rank over its own tokens (as in one process with
gradient accumulation over micro-batches), so with `train.aux_weight` > 0 a run at N ranks is not
the same function of the data as one process; cross-entropy, distillation and z-loss are.

## Checkpoints

`checkpoints/step-NNNNNN/` from a multi-process run holds `dcp/` (torch.distributed.checkpoint:
each rank writes its shards; loadable at any world size, 1 included, with or without a process
group), `config.json` (ModelConfig, layer order), `train_state.json` (step, data position, RNG
of every rank) and `manifest.json` (sha256 of every file, `dcp/.metadata` included), written by
rank 0 after every rank has finished, into a temporary folder renamed into place. The final
`parent/` is the usual single-file safetensors model folder, gathered on rank 0.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import datetime
import enum
import errno
import hashlib
import importlib
import json
import logging
import os
import pathlib
import pickle
import shutil
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, begin_folder, publish_folder, write_json
from .config import ConfigError
from .model import ElasticMoE
from .subnet import LayerSpec, Subnet

log = logging.getLogger(__name__)

PARALLEL_CHOICES = ("auto", "fsdp", "ddp")
GRAD_BUCKET_BYTES = 64 << 20  # all-reduce gradients in flat buckets of at most this size
# Test hooks (read only in multi-process runs): make one rank disagree, to prove it is caught.
TEST_DIVERGE_ENV = "ELASTICMOE_TEST_DIVERGE_RANK"  # "RANK" or "RANK:STEP": perturb its sub-networks
# "RANK:STEP": that rank's loss becomes NaN at that step, in its second sub-network (after the first
# backward pass, so FSDP has already reduce-scattered) or its only one
TEST_NAN_ENV = "ELASTICMOE_TEST_NAN"
TEST_STOP_ENV = "ELASTICMOE_TEST_STOP"  # "RANK:STEP": that rank SIGSTOPs itself at that step (a hung rank)
COLLECTIVE_TIMEOUT_ENV = "ELASTICMOE_COLLECTIVE_TIMEOUT_S"
DEFAULT_COLLECTIVE_TIMEOUT_S = 600


class RankDivergenceError(RuntimeError):
    """Ranks sampled different sub-networks; their collectives would not match."""


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"environment variable {name}={os.environ[name]!r} must be an integer") from None


def collective_timeout() -> datetime.timedelta:
    """The watchdog: a collective that waits longer than this for another rank (hung, stopped,
    swapped out) fails on every waiting rank with an error, instead of blocking the job forever.
    Long enough for rank 0's slowest solo work between collectives (publishing the parent)."""
    seconds = _env_int(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S)
    if seconds < 1:
        raise ConfigError(f"{COLLECTIVE_TIMEOUT_ENV}={seconds} must be >= 1 (seconds)")
    return datetime.timedelta(seconds=seconds)


def describe_failure(exc: BaseException) -> str | None:
    """One line for a collective that timed out (the watchdog fired), else None."""
    text = str(exc)
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (
            f"a collective waited more than {collective_timeout().seconds} s for another rank (hung, stopped or "
            f"dead): stopping this job; resume it with --resume. Set {COLLECTIVE_TIMEOUT_ENV} to change the limit "
            f"({text.splitlines()[0][:160] if text else 'timeout'})"
        )
    return None


def setup(device: torch.device, parallel: str = "auto") -> Parallel:
    """The Parallel for this process: single-process (no process group) unless launched by torchrun
    with WORLD_SIZE > 1, or a process group already exists. Picks gloo on CPU, NCCL on CUDA."""
    if parallel not in PARALLEL_CHOICES:
        raise ConfigError(f"parallel={parallel!r}; allowed {list(PARALLEL_CHOICES)}")
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Parallel(device)
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not initialized:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, device_id=device if device.type == "cuda" else None, timeout=collective_timeout()
        )
    mode = parallel if parallel != "auto" else ("fsdp" if device.type == "cuda" else "ddp")
    cls = Sharded if mode == "fsdp" else Replicated
    par = cls(device, dist.get_rank(), dist.get_world_size(), owns_group=not initialized)
    if not par.is_main:  # print0: other ranks only warn
        logging.getLogger("elasticmoe").setLevel(logging.WARNING)
    log.info("%s over %d processes (%s, %s)", par.mode, par.world_size, dist.get_backend(), device.type)
    return par


class Parallel:
    """One process: every collective is the identity, every hook a no-op (the loop stays bit-exact)."""

    mode = "single"

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1, owns_group: bool = False):
        self.device, self.rank, self.world_size, self.owns_group = device, rank, world_size, owns_group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: ElasticMoE) -> ElasticMoE:
        return model

    def agree_on_subnets(self, step: int, subnets: list[tuple[str, Subnet]]) -> list[tuple[str, Subnet]]:
        return subnets

    def all_finite(self, loss: torch.Tensor, step: int) -> bool:
        return bool(torch.isfinite(loss))

    def sync_grads(self, model: ElasticMoE) -> None:
        pass

    def clip_grad_norm(self, model: ElasticMoE, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def mean(self, values: list[float]) -> list[float]:
        return list(values)

    def sum_ints(self, values: list[int]) -> list[int]:
        return list(values)

    def on_main(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def main_model(self, model: ElasticMoE) -> ElasticMoE | None:
        return model

    def reorder(self, model: ElasticMoE, opt, fn: Callable[[ElasticMoE, Any], dict]) -> dict:
        return fn(model, opt)

    def close(self) -> None:
        pass


class Replicated(Parallel):
    """Every rank holds the whole model; gradients are all-reduced once per step (see module doc)."""

    mode = "ddp"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # NCCL collectives need CUDA tensors; gloo takes CPU ones
        self.comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self._diverge = _parse_hook(TEST_DIVERGE_ENV, self.rank, step_required=False)
        self._nan = _parse_hook(TEST_NAN_ENV, self.rank, step_required=True)
        self._stop = _parse_hook(TEST_STOP_ENV, self.rank, step_required=True)
        self._checks = (-1, 0)  # (step, finiteness checks so far in it), for the NaN hook

    # -- setup ---------------------------------------------------------------------------------
    def wrap(self, model: ElasticMoE) -> ElasticMoE:
        self._broadcast([*model.parameters(), *model.buffers()])  # identical start even if inits differ
        return model

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for t in tensors:
                buf = t.detach() if t.device == self.comm_device else t.detach().to(self.comm_device)
                dist.broadcast(buf, src=0)
                if buf is not t:
                    t.detach().copy_(buf)

    # -- per step ------------------------------------------------------------------------------
    def agree_on_subnets(self, step: int, subnets: list[tuple[str, Subnet]]) -> list[tuple[str, Subnet]]:
        """Check (one all-gather of 8 bytes) that every rank sampled the same sub-networks."""
        if self._diverge is not None and step >= self._diverge:
            subnets = _perturbed(subnets)
        text = json.dumps([[name, sn.to_dict()] for name, sn in subnets], sort_keys=True)
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)
        mine = torch.tensor([digest], dtype=torch.int64, device=self.comm_device)
        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        digests = [int(d.item()) for d in every]
        if len(set(digests)) == 1:
            return subnets
        every_list: list[Any] = [None] * self.world_size
        dist.all_gather_object(every_list, [(name, str(sn)) for name, sn in subnets])
        other = next(r for r, d in enumerate(digests) if d != digests[0])
        ours, theirs = every_list[0], every_list[other]
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        show = lambda pairs: ", ".join(f"{n}={s}" for n, s in pairs)  # noqa: E731
        raise RankDivergenceError(
            f"ranks sampled different sub-networks at step {step}: sub-network #{first} is "
            f"{show(ours[first : first + 1]) or 'absent'} on rank 0 but {show(theirs[first : first + 1]) or 'absent'} "
            f"on rank {other} (rank 0: [{show(ours)}]; rank {other}: [{show(theirs)}]). Every rank must train "
            "the same sub-networks (same recipe, seed and layer order); stopping rather than hang in mismatched "
            "collectives"
        )

    def all_finite(self, loss: torch.Tensor, step: int) -> bool:
        """True when the loss is finite on every rank (all-reduce MIN of a flag)."""
        self._checks = (step, self._checks[1] + 1 if self._checks[0] == step else 1)
        if self._stop is not None and step == self._stop:
            os.kill(os.getpid(), signal.SIGSTOP)
        if self._nan is not None and step == self._nan and self._checks[1] == 2:
            loss = loss * float("nan")
        flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1).to(self.comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def sync_grads(self, model: ElasticMoE) -> None:
        """Average every gradient over ranks in flat buckets. A parameter without a gradient sends
        zeros; it gets the average if any rank had a gradient for it, else it keeps none."""
        params = [p for p in model.parameters() if p.requires_grad]
        for bucket in _buckets(params, GRAD_BUCKET_BYTES):
            ref = bucket[0]
            parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]
            has = torch.tensor([float(p.grad is not None) for p in bucket], dtype=ref.dtype, device=ref.device)
            flat = torch.cat([*parts, has]).to(self.comm_device)
            dist.all_reduce(flat)
            n_grad = flat.numel() - len(bucket)
            flat[:n_grad].div_(self.world_size)
            flat = flat.to(ref.device)
            offset = 0
            for p, count in zip(bucket, flat[n_grad:].tolist()):
                g = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                p.grad = g if count > 0 else None

    def mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def sum_ints(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t)
        return [int(v) for v in t.tolist()]

    # -- coordination --------------------------------------------------------------------------
    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0 only and hand every rank its result; an error there is raised on
        every rank (a ConfigError stays a ConfigError), so no rank waits for one that failed."""
        box: list[Any] = [None]
        failure: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                failure = exc
                box[0] = ("config" if isinstance(exc, ConfigError) else "error", str(exc))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if failure is not None:
            raise failure
        if kind == "config":
            raise ConfigError(value)
        if kind == "error":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_model(self, model: ElasticMoE) -> ElasticMoE | None:
        return model if self.is_main else None

    def reorder(self, model: ElasticMoE, opt, fn: Callable[[ElasticMoE, Any], dict]) -> dict:
        """Importance re-ordering on rank 0, then its parameters, buffers (a router's selection bias
        moves with its expert), optimizer state and layer order broadcast: ranks must not each
        measure (CUDA index_add is not bit-deterministic, and a near-tie could then permute
        differently on different ranks)."""
        summary = fn(model, opt) if self.is_main else None
        tensors = [*model.parameters(), *model.buffers()]
        for p in model.parameters():
            state = opt.state.get(p, {})
            tensors += [state[k] for k in sorted(state) if torch.is_tensor(state[k])]
        self._broadcast(tensors)
        order, summary = self.broadcast_object((list(model.layer_order), summary))
        model.layer_order = list(order)
        return summary

    def close(self) -> None:
        """Leave the process group cleanly: after a normal finish every rank first meets at a
        barrier, so no rank tears the group down while another still uses it (an abort at exit).
        After an error no barrier (the other ranks may never come): just destroy."""
        if self.owns_group and dist.is_initialized():
            if sys.exc_info()[0] is None:
                try:
                    dist.barrier()
                except Exception as exc:  # noqa: BLE001 - a rank died at the end: still tear down
                    log.warning("barrier before shutdown failed: %s", exc)
            dist.destroy_process_group()


class Sharded(Replicated):
    """FSDP2: each Block and the root are `fully_shard` units over a 1-D mesh of all ranks."""

    mode = "fsdp"

    def wrap(self, model: ElasticMoE) -> ElasticMoE:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        super().wrap(model)  # every rank shards the same full tensors
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def sync_grads(self, model: ElasticMoE) -> None:
        pass  # reduce-scattered (and averaged) in each backward's post-backward hooks

    def clip_grad_norm(self, model: ElasticMoE, max_norm: float) -> torch.Tensor:
        """torch's clip_grad_norm_ formula over sharded gradients: the norm of the local shards'
        squared norms summed over ranks (FSDP2 shards do not overlap)."""
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in model.parameters()]
        grads = [g for g in grads if g is not None]
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        for g in grads:
            squares = squares + g.float().pow(2).sum()
        squares = squares.to(self.comm_device)
        dist.all_reduce(squares)
        total = squares.sqrt().to(self.device)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    def main_model(self, model: ElasticMoE) -> ElasticMoE | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _plain_copy(model, full, "cpu") if self.is_main else None

    def reorder(self, model: ElasticMoE, opt, fn: Callable[[ElasticMoE, Any], dict]) -> dict:
        """Gather full parameters and optimizer state on every rank, re-order a plain copy on rank 0,
        broadcast the permuted tensors and re-shard them."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        options = StateDictOptions(full_state_dict=True)
        msd, osd = get_state_dict(model, opt, options=options)
        summary, order = None, None
        if self.is_main:
            plain = _plain_copy(model, msd, self.device)
            params = dict(plain.named_parameters())
            summary = fn(plain, SimpleNamespace(state={params[n]: st for n, st in osd["state"].items()}))
            order = list(plain.layer_order)
            with torch.no_grad():
                for key, value in plain.state_dict().items():
                    msd[key].copy_(value)
        tensors = [msd[k] for k in sorted(msd)]
        for name in sorted(osd["state"]):
            st = osd["state"][name]
            tensors += [st[k] for k in sorted(st) if torch.is_tensor(st[k])]
        self._broadcast(tensors)
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd, options=options)
        order, summary = self.broadcast_object((order, summary))
        model.layer_order = list(order)
        return summary


# -- helpers -------------------------------------------------------------------------------------
def _parse_hook(name: str, rank: int, step_required: bool) -> int | None:
    """A test hook "RANK" or "RANK:STEP": the step from which it acts on this rank, else None."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    who, _, when = raw.partition(":")
    if step_required and not when:
        raise ConfigError(f"{name}={raw!r} must look like RANK:STEP")
    return int(when or 0) if int(who) == rank else None


def _perturbed(subnets: list[tuple[str, Subnet]]) -> list[tuple[str, Subnet]]:
    """The test hook's disagreement: the last sub-network's expert width changed by one."""
    name, sn = subnets[-1]
    specs = tuple(LayerSpec(s.experts, s.top_k, s.width - 1 if s.width > 1 else 2) for s in sn.specs)
    return [*subnets[:-1], (name, Subnet(sn.layers, specs))]


def _buckets(params: list[torch.nn.Parameter], cap_bytes: int) -> list[list[torch.nn.Parameter]]:
    out: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        fits = out and out[-1][0].dtype == p.dtype and out[-1][0].device == p.device and size + nbytes <= cap_bytes
        if not fits:
            out.append([])
            size = 0
        out[-1].append(p)
        size += nbytes
    return out


def _plain_copy(model: ElasticMoE, full: dict[str, torch.Tensor], device) -> ElasticMoE:
    """An unsharded ElasticMoE holding `full` (a full state dict); the global RNG is left alone."""
    with torch.random.fork_rng(devices=[]):
        plain = ElasticMoE(model.config)
    plain.load_state_dict(full, strict=True)
    plain.layer_order = list(model.layer_order)
    return plain.to(device)


# -- sharded checkpoints ---------------------------------------------------------------------
def is_sharded(folder: Path) -> bool:
    return (Path(folder) / "dcp" / ".metadata").is_file()


def save_sharded(par: Replicated, path: Path, model, opt, json_files: dict[str, Any]) -> Path:
    """Collective: every rank writes its shards of model + optimizer with torch.distributed.checkpoint
    into a temporary folder; then rank 0 writes `json_files`, the manifest, and renames into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)

    tmp = Path(par.on_main(lambda: str(begin_folder(path, "checkpoint"))))
    msd, osd = get_state_dict(model, opt)
    try:
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    except BaseException as exc:
        if par.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, KeyboardInterrupt):
            _raise_if_disk_full(path, _state_bytes(msd, osd, par.world_size))
        raise

    def finish() -> None:
        try:
            for name, data in json_files.items():
                write_json(tmp / name, data)
            publish_folder(tmp, path, "checkpoint")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    par.on_main(finish)  # also the barrier: no rank goes on before the folder is in place
    return path


def _state_bytes(msd: dict, osd: dict, world: int) -> int:
    """About how many bytes a sharded checkpoint of these state dicts takes on disk, all ranks
    together: sharded tensors (FSDP2) are this rank's shard x the world size, replicated ones (DDP)
    are written once."""
    total, sharded = 0, False
    stack: list[Any] = [msd, osd]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, torch.Tensor):
            if hasattr(item, "to_local"):
                sharded, item = True, item.to_local()
            total += item.numel() * item.element_size()
    return total * (world if sharded else 1)


def _raise_if_disk_full(path: Path, need: int) -> None:
    """DCP reports a full disk as torch.save's "unexpected pos" from inside its writer threads: when
    the disk the checkpoint goes to has less room than the checkpoint needs, say so in one line."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: checkpoint {path.name} needs about {need / 2**20:,.1f} MiB, "
            f"{free / 2**20:,.1f} MiB free",
            str(path.parent),
        ) from None


class _MetadataUnpickler(pickle.Unpickler):
    """DCP stores its `.metadata` as a pickle. This unpickler admits only the plain data classes of
    `torch.distributed.checkpoint` and torch's dtype/layout/memory-format/Size values, the way
    `torch.load(weights_only=True)` admits only tensors: a crafted file cannot run code."""

    _TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint"):
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        if module == "torch.serialization" and name == "_get_layout":  # maps a layout's name to torch.strided etc.
            return _layout_by_name
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), self._TORCH_VALUES):
            return getattr(torch, name)
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"):
            return getattr(pathlib, name)  # DCP records the checkpoint path; building a path runs nothing
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "builtins" and name in ("set", "frozenset", "tuple", "list", "dict", "slice"):
            return getattr(builtins, name)
        raise CheckpointError(f"sharded checkpoint metadata refers to {module}.{name}, which is not allowed")


def _layout_by_name(name: str) -> torch.layout:
    layout = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(layout, torch.layout):
        raise CheckpointError(f"sharded checkpoint metadata names an unknown tensor layout {name!r}")
    return layout


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(Path(path) / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def load_sharded(folder: Path, model, opt) -> None:
    """Load a sharded checkpoint's model and optimizer at any world size (resharding as needed);
    works in a plain single process too (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    try:
        with warnings.catch_warnings():  # "no process group: loading in a single process" is the point
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, storage_reader=_safe_reader(Path(folder) / "dcp"))
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{folder / 'dcp'} cannot be loaded into this model: {first}") from None
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full(model, opt, model_tensors: dict[str, torch.Tensor], optim_state: dict) -> None:
    """Load full (unsharded) tensors, e.g. a single-process checkpoint, into a possibly sharded
    model and its optimizer; `optim_state` is {"state": {name: {...}}, "param_groups": [...]}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        opt,
        model_state_dict=model_tensors,
        optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True),
    )
