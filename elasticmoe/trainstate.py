"""Training state on disk: checkpoints with model, optimizer, RNG and data position, written
atomically with a manifest, found by step, verified before use, resumable in one process or under
torchrun (sharded with torch.distributed.checkpoint) at any world size.

    checkpoints/step-NNNNNN/  model.safetensors  config.json  optimizer.safetensors  train_state.json
                              manifest.json      (sharded: dcp/ instead of the two .safetensors)

Tensors are safetensors; everything else is JSON. Nothing here unpickles (the sharded metadata is
read by `dist`'s allow-list unpickler).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from . import dist as distmod
from .checkpoint import (
    AtomicFolder,
    CheckpointError,
    clean_stale,
    read_json_object,
    save_model_files,
    save_tensors,
    verify_manifest,
    write_json,
)
from .config import ConfigError
from .model import ElasticMoE

log = logging.getLogger(__name__)


def _optimizer_tensors(opt: torch.optim.Optimizer, model: ElasticMoE) -> tuple[dict[str, torch.Tensor], dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, meta = {}, {"param_groups": []}
    for g in opt.param_groups:
        meta["param_groups"].append(
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
            | {"params": [names[id(p)] for p in g["params"]]}
        )
    for p, st in opt.state.items():
        for k, v in st.items():
            tensors[f"{names[id(p)]}::{k}"] = v.detach().contiguous().cpu() if torch.is_tensor(v) else torch.tensor(v)
    return tensors, meta


def _state_by_param(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"param::exp_avg": t, ...} (as `_optimizer_tensors` writes them) -> {param: {"exp_avg": t}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        name, _, k = key.rpartition("::")
        out.setdefault(name, {})[k] = v
    return out


def _load_optimizer(opt: torch.optim.Optimizer, model: ElasticMoE, tensors: dict, meta: dict) -> None:
    params = dict(model.named_parameters())
    opt.state.clear()
    for name, st in _state_by_param(tensors).items():
        opt.state[params[name]] = {k: v if k == "step" else v.to(params[name].device) for k, v in st.items()}
    for g, saved in zip(opt.param_groups, meta["param_groups"]):
        for k, v in saved.items():
            if k != "params":
                g[k] = tuple(v) if isinstance(v, list) else v


def _rng_state() -> dict:
    py_state = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _set_rng_state(rng: dict) -> None:
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = rng["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))


def _prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    ckpts = _checkpoints(run_dir)
    for old in ckpts[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def recipe_fingerprint(run_dir: Path) -> str | None:
    """sha256 of the run's recipe (recipe.yaml parsed, as canonical JSON), or None without one.
    Every checkpoint records it, so a resume can tell that recipe.yaml changed under it."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        return None
    from .config import load_mapping

    canonical = json.dumps(load_mapping(path), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256_cached(path: Path) -> str:
    """sha256 of a file, kept per (path, size, mtime) so that a checkpoint every N steps does not
    hash the same token arrays again."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        from .checkpoint import sha256_file

        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


SHARD_SAMPLE = 1 << 20  # bytes read from the start, middle and end of each training shard


def _sampled_sha256(path: Path) -> str:
    """sha256 of a file's size and of up to 3 x `SHARD_SAMPLE` bytes at its start, middle and end:
    what a resume can afford for shards of any size. A re-tokenized or replaced shard changes its
    size or these bytes; an edit confined to the unread middle parts goes unnoticed."""
    st = path.stat()
    key = ("sampled:" + str(path.resolve()), st.st_size, st.st_mtime_ns)  # once per version, not per checkpoint
    if key not in _SHA_CACHE:
        size = st.st_size
        h = hashlib.sha256(f"{size}\n".encode())
        with open(path, "rb") as f:
            for start in sorted({0, max(0, size // 2 - SHARD_SAMPLE // 2), max(0, size - SHARD_SAMPLE)}):
                f.seek(start)
                h.update(f.read(SHARD_SAMPLE))
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def data_fingerprint(run_dir: Path) -> dict[str, str] | None:
    """sha256 of what the run trains on, by part: the tokenizer, the prepared token arrays (names
    and contents), the list of memory-mapped training shards, and those shards' sizes and sampled
    contents (`_sampled_sha256`); None without prepared data (a fine-tune reads another run's).
    Every checkpoint records it, so a resume can tell that the data under it was replaced or
    prepared again from a changed corpus."""
    folder = Path(run_dir) / "data"
    if not (folder / "ready").is_file():
        return None
    parts = {"tokenizer.json": [folder / "tokenizer.json"], "tokens": sorted((folder / "tokens").glob("*.npy"))}
    parts["shards.json"] = [folder / "shards.json"]
    out = {}
    for part, files in parts.items():
        h = hashlib.sha256()
        for f in files:
            if f.is_file():
                h.update(f"{f.name}:{_sha256_cached(f)}\n".encode())
        out[part] = h.hexdigest()
    if (folder / "shards.json").is_file():
        from .data import _expand

        h = hashlib.sha256()
        for pattern in json.loads((folder / "shards.json").read_text()).get("train", []):
            for shard in _expand(str(pattern), "token shard"):  # globs as training expands them
                h.update(f"{shard}:{_sampled_sha256(shard) if shard.is_file() else 'missing'}\n".encode())
        out["shards"] = h.hexdigest()
    return out


def _check_inputs_unchanged(run_dir: Path, path: Path, state: dict) -> None:
    """Refuse a resume whose recipe or data differ from those `path` was trained with, naming what changed."""
    saved, now = state.get("recipe_sha256"), recipe_fingerprint(run_dir)
    if saved is not None and now is not None and saved != now:
        raise ConfigError(
            f"{run_dir / 'recipe.yaml'} is not the recipe {path.name} was trained with (it changed since): "
            "an exact resume needs that recipe; restore it, or start a new run with another --out"
        )
    saved, now = state.get("data_sha256"), data_fingerprint(run_dir)
    if isinstance(saved, dict) and now is not None:
        changed = [f"data/{part}" for part in now if part in saved and saved[part] != now[part]]
        if changed:
            raise ConfigError(
                f"--resume: {', '.join(changed)} changed since {path.name} was written (replaced, or prepared again "
                "from changed data): an exact resume needs the data it trained on; restore it, or start a new run "
                "with another --out"
            )


_STATE_FIELDS = {"step": int, "bad_in_row": int, "tokens_seen": int, "data": dict}


def _check_loadable(path: Path, state: dict) -> None:
    """What a manifest cannot vouch for (it can be recomputed over damaged files): train_state.json
    has the fields a resume reads, with their types, and every safetensors header parses. A
    checkpoint failing this is skipped like a corrupted one (the previous one is used)."""
    bad = [k for k, kind in _STATE_FIELDS.items() if not isinstance(state.get(k), kind) or isinstance(state[k], bool)]
    if bad:
        raise CheckpointError(f"{path / 'train_state.json'}: fields {bad} are missing or of the wrong type")
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as exc:  # safetensors' own header validation (JSON, offsets, sizes)
            raise CheckpointError(f"{f} has an invalid safetensors header: {exc}") from None


def _refuse_finished_without_checkpoints(run_dir: Path) -> None:
    for name in ("parent", "model"):
        if (Path(run_dir) / name / "manifest.json").is_file():
            raise ConfigError(
                f"--resume: {run_dir} holds a finished {name}/ and no checkpoint to resume from; --resume never "
                "restarts from step 0 (that would replace it): start a new run with another --out"
            )


def save_checkpoint(run_dir: Path, step: int, model, opt, train_state: dict, keep_last: int) -> Path:
    path = run_dir / "checkpoints" / f"step-{step:06d}"
    train_state = {
        **train_state,
        "recipe_sha256": recipe_fingerprint(run_dir),
        "data_sha256": data_fingerprint(run_dir),
    }
    with AtomicFolder(path, "checkpoint") as tmp:
        save_model_files(tmp, model, meta={"step": step})
        tensors, meta = _optimizer_tensors(opt, model)
        tensors["rng::torch"] = torch.get_rng_state()
        save_tensors(tensors, tmp / "optimizer.safetensors")
        write_json(tmp / "train_state.json", {**train_state, "step": step, "optimizer": meta, "rng": _rng_state()})
    _prune_checkpoints(run_dir, keep_last)
    return path


def save_sharded_checkpoint(par, run_dir: Path, step: int, model, opt, train_state: dict, keep_last: int) -> Path:
    """Collective (every rank): a torch.distributed.checkpoint folder, see dist.py."""
    path = run_dir / "checkpoints" / f"step-{step:06d}"
    rng = par.gather_object({**_rng_state(), "torch": torch.get_rng_state().tolist()})
    config = {
        "format": "elasticmoe-model",
        "model": model.config.to_dict(),
        "layer_order": list(model.layer_order),
        "meta": {"step": step, "tensors": "dcp"},
    }
    state = {**train_state, "step": step, "world_size": par.world_size, "parallel": par.mode, "rng_per_rank": rng}
    state["recipe_sha256"] = par.on_main(lambda: recipe_fingerprint(run_dir))
    state["data_sha256"] = par.on_main(lambda: data_fingerprint(run_dir))
    distmod.save_sharded(par, path, model, opt, {"config.json": config, "train_state.json": state})
    par.on_main(lambda: _prune_checkpoints(run_dir, keep_last))
    return path


def _checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders by step number (not by name: step-1000000 comes after step-999999)."""
    found = [p for p in (run_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def clean_stale_temporaries(run_dir: Path) -> None:
    """Remove what killed writers left in a run folder: half-written checkpoint folders (never
    valid: they were never renamed into place) and the temporaries of its files and folders. Call
    it with the run folder locked (`runfolder.lock`), so no live writer's temporaries are touched."""
    for p in (run_dir / "checkpoints").glob(".step-*"):
        shutil.rmtree(p, ignore_errors=True)
    clean_stale(run_dir)


def _quarantine(path: Path) -> Path:
    """Move a checkpoint that failed verification to checkpoints/corrupted/ (kept for inspection,
    out of the way of step ordering and pruning)."""
    dest_dir = path.parent / "corrupted"
    dest_dir.mkdir(exist_ok=True)
    dest, n = dest_dir / path.name, 1
    while dest.exists():
        dest, n = dest_dir / f"{path.name}.{n}", n + 1
    path.rename(dest)
    return dest


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies (manifest complete, every checksum right), or None when
    the run has none yet. Checkpoints that fail are reported; those newer than the one chosen are
    moved to checkpoints/corrupted/ so later saves and pruning order by step among valid ones.
    If checkpoints exist and none verifies, raise naming each and why: a resume never silently
    restarts from step 0, nor does a run whose final model exists and whose checkpoints are gone. A
    checkpoint trained with another recipe than recipe.yaml, or on other data (tokenizer, token
    arrays, shards: `data_fingerprint`), is refused, naming what changed."""
    found = _checkpoints(run_dir)
    failed: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            verify_manifest(path)
            state = read_json_object(path / "train_state.json")
            _check_loadable(path, state)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
            failed.append((path, str(exc)))
            continue
        _check_inputs_unchanged(run_dir, path, state)
        for bad, _ in failed:
            log.warning("moved %s to %s", bad, _quarantine(bad))
        return path
    if failed:
        why = "; ".join(f"{p.name}: {msg}" for p, msg in failed)
        raise CheckpointError(
            f"--resume: no checkpoint in {run_dir / 'checkpoints'} verifies, refusing to restart from step 0 ({why}). "
            "Restore them, or move them away to train from scratch"
        )
    _refuse_finished_without_checkpoints(run_dir)
    return None


def load_checkpoint(path: Path, model: ElasticMoE, opt) -> dict:
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    model.layer_order = list(read_json_object(path / "config.json")["layer_order"])
    tensors = load_file(str(path / "optimizer.safetensors"))
    state = read_json_object(path / "train_state.json")
    torch.set_rng_state(tensors.pop("rng::torch"))
    _load_optimizer(opt, model, tensors, state["optimizer"])
    _set_rng_state(state["rng"])
    return state


def load_any_checkpoint(path: Path, model, opt, par) -> dict:
    """Resume from a single-process or a sharded checkpoint, at any world size."""
    if distmod.is_sharded(path):
        distmod.load_sharded(path, model, opt)
        model.layer_order = list(read_json_object(path / "config.json")["layer_order"])
        state = read_json_object(path / "train_state.json")
        rngs = state["rng_per_rank"]
        rng = rngs[par.rank % len(rngs)]  # at another world size ranks reuse the saved states in turn
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        _set_rng_state(rng)
        return state
    if par.world_size == 1:
        return load_checkpoint(path, model, opt)
    tensors = load_file(str(path / "optimizer.safetensors"))  # full tensors, resharded on load
    state = read_json_object(path / "train_state.json")
    torch.set_rng_state(tensors.pop("rng::torch"))
    per_param = _state_by_param(tensors)
    groups = [
        {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
        for g in state["optimizer"]["param_groups"]
    ]
    model_tensors = load_file(str(path / "model.safetensors"))
    distmod.load_full(model, opt, model_tensors, {"state": per_param, "param_groups": groups})
    model.layer_order = list(read_json_object(path / "config.json")["layer_order"])
    _set_rng_state(state["rng"])
    return state
