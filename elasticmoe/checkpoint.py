"""Self-describing model folders and atomic, checksummed writes.

A model folder (parent, child or training step) holds:

    model.safetensors   the tensors (safetensors only: nothing is ever unpickled)
    config.json         {"format": "elasticmoe-model", "model": ModelConfig, "layer_order": [...], "meta": {...}}
    manifest.json       sha256 and size of every other file, written last

A folder is complete exactly when its manifest exists and every checksum matches; folders are
written under a temporary name and renamed into place, so a crash never leaves a folder that
looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig

MANIFEST = "manifest.json"
FORMAT = "elasticmoe-model"


class CheckpointError(ConfigError):
    """A checkpoint folder is missing, incomplete or corrupted (the message names the file)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder + fsync + rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def write_manifest(folder: Path) -> None:
    files = {}
    for p in sorted(folder.rglob("*")):
        temporary = p.name.startswith(".") and (p.name.endswith(".tmp") or p.name == ".write-probe")
        if p.is_file() and p.name != MANIFEST and not temporary:  # dot-files such as DCP's .metadata count
            files[str(p.relative_to(folder))] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    write_json(folder / MANIFEST, {"files": files})


def verify_manifest(folder: Path) -> None:
    """Raise CheckpointError naming the first file that is missing or whose checksum differs."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{folder} is incomplete: no {MANIFEST}")
    files = read_json(manifest).get("files", {})
    for name, info in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (listed in {manifest})")
        if p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{p} is corrupted: checksum does not match {manifest}")


class AtomicFolder:
    """Context manager: build a folder under a temporary name, manifest it, rename into place.

    On error the temporary folder is removed and nothing appears at `path`. An existing folder at
    `path` is replaced only after the new one is complete, and only if it is one of ours (it has a
    manifest) or empty: a mistyped `--out` never deletes a user's files.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __enter__(self) -> Path:
        if self.path.exists() and not (self.path / MANIFEST).is_file():
            if not self.path.is_dir() or any(self.path.iterdir()):
                raise CheckpointError(
                    f"{self.path} exists and is not a folder elasticmoe wrote (no {MANIFEST}); refusing to replace "
                    "it: choose another output path or remove it yourself"
                )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.tmp"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        write_manifest(self.tmp)
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_model_files(folder: Path, model, meta: dict[str, Any] | None = None) -> None:
    """Write model.safetensors and config.json into an (already temporary) folder."""
    save_file(state_dict_for_save(model), str(folder / "model.safetensors"))
    write_json(
        folder / "config.json",
        {
            "format": FORMAT,
            "model": model.config.to_dict(),
            "layer_order": list(model.layer_order),
            "meta": meta or {},
        },
    )


def save_model(path: Path | str, model, meta: dict[str, Any] | None = None, extra_files: dict[str, Path] | None = None):
    """Atomically write a complete model folder (tensors, config, optional extra files, manifest)."""
    with AtomicFolder(path) as tmp:
        save_model_files(tmp, model, meta)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
    return Path(path)


def load_model(path: Path | str, device: str | torch.device = "cpu", verify: bool = True):
    """Load a model folder written by `save_model`. Returns (model, meta). Checksums verified."""
    from .model import ElasticMoE

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    if verify:
        verify_manifest(folder)
    cfg = read_json(folder / "config.json")
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{folder / 'config.json'} is not an elasticmoe model config")
    config = ModelConfig.from_dict(cfg["model"])
    model = ElasticMoE(config)
    try:
        tensors = load_file(str(folder / "model.safetensors"), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{folder / 'model.safetensors'} cannot be read: {exc}") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{folder / 'model.safetensors'} does not match config.json: {exc}") from None
    model.layer_order = list(cfg.get("layer_order", range(config.layers)))
    return model.to(device), cfg.get("meta", {})
