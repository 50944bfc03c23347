"""Self-describing model folders, ownership markers, and the package's one atomic-publish mechanism.

A model folder (parent, child or training step) holds:

    model.safetensors   the tensors (safetensors only: nothing is ever unpickled)
    config.json         {"format": "elasticmoe-model", "model": ModelConfig, "layer_order": [...], "meta": {...}}
    .elasticmoe.json    the ownership marker: {"format": "elasticmoe", "kind": ..., "id": ..., "run": ...}
    manifest.json       sha256 and size of every other file, written last

A folder is complete exactly when its manifest exists, lists every file in the folder and every
checksum matches; folders are written under a temporary name and renamed into place, so a crash
never leaves a folder that looks valid.

Ownership: a folder is elasticmoe's only if it carries the marker (a `manifest.json` alone proves
nothing: web apps have one). An existing folder is replaced only by a folder of the same kind
written for the same run, and nothing is ever written inside a marked folder of another kind (a
model, a checkpoint, an export): `extract --out RUN/parent` or `export --out RUN/checkpoints/step-N`
are refused. Published files and folders get the modes the user's umask allows (0644/0755 under
umask 022), like any file the user's shell would create.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig

MANIFEST = "manifest.json"
MARKER = ".elasticmoe.json"
FORMAT = "elasticmoe-model"
CONTAINER_KINDS = ("run",)  # marked folders that hold other outputs (a run folder); the others are leaves
LEGACY_TMP_AGE_S = 600  # temporaries named by older versions (no pid in the name) are removed after this


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


# -- temporaries: named after their writer's pid, so a dead writer's leftovers can be told apart ----
TMP_NAME_CHARS = 200  # of the published name kept in a temporary's: room for the suffixes in NAME_MAX (255)


def _tmp_file_name(name: str) -> str:
    return f".{name[:TMP_NAME_CHARS]}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _tmp_dir_name(name: str) -> str:
    return f".{name[:TMP_NAME_CHARS]}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def _is_temporary(name: str) -> bool:
    """Names our writers give temporaries (never listed in a manifest)."""
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name or name == ".write-probe")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_OURS_TMP = re.compile(r"\.(?P<name>.+?)\.(?:tmp-)?(?P<pid>\d+)-[0-9a-f]{8}(?:\.tmp)?")
_LEGACY_TMP = re.compile(r"\.(?P<name>.+?)\.(?:tmp[a-z0-9_]{8}|[a-z0-9_]{8}\.tmp)")


def clean_stale(parent: Path, name: str | None = None) -> list[Path]:
    """Remove the temporaries of `parent/name` (of any name when None) that killed writers left
    behind: ours carry the writer's pid (removed once that process is gone); those of older
    versions (`.NAME.tmpXXXXXXXX`, `.NAME.XXXXXXXX.tmp`) once older than LEGACY_TMP_AGE_S. Also
    finishes an interrupted replace: a marked `.NAME.old` is restored when NAME is missing, removed
    otherwise. Returns what was removed."""
    parent, removed = Path(parent), []
    if not parent.is_dir():
        return removed
    for p in list(parent.iterdir()):
        m, legacy = _OURS_TMP.fullmatch(p.name), _LEGACY_TMP.fullmatch(p.name)
        if m is not None and (name is None or m["name"] == name[:TMP_NAME_CHARS]):
            stale = not _pid_alive(int(m["pid"]))
        elif legacy is not None and (name is None or legacy["name"] == name):
            stale = time.time() - p.lstat().st_mtime > LEGACY_TMP_AGE_S
        else:
            stale = False
        if stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    for old in parent.glob(".*.old") if name is None else [parent / f".{name}.old"]:
        target = old.with_name(old.name[1:-4])
        if old.is_dir() and read_marker(old) is not None:
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
                removed.append(old)
            else:
                os.replace(old, target)
    return removed


# -- atomic files --------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder + fsync + rename. The file is created with
    mode 0666 less the umask, like any file the user creates (mkstemp would give 0600)."""
    path = Path(path)
    clean_stale(path.parent, path.name)
    tmp = path.with_name(_tmp_file_name(path.name))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:  # the parser's own depth limit: nothing we write nests that deep
        raise CheckpointError(f"{path} is not a file elasticmoe wrote: JSON nested too deeply") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """read_json for files whose top level must be an object (a list there is an error, not a crash)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: top level must be an object, found {type(data).__name__}")
    return data


# -- ownership markers ---------------------------------------------------------------------------
def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's elasticmoe marker, or None when it has none (or an unreadable one)."""
    p = Path(folder) / MARKER
    if p.is_symlink() or not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != "elasticmoe" or not isinstance(data.get("kind"), str):
        return None
    return data


def write_marker(folder: Path, kind: str, run: str | None = None) -> dict[str, Any]:
    marker = {"format": "elasticmoe", "kind": kind, "id": uuid.uuid4().hex, "run": run, "created": time.time()}
    write_json(Path(folder) / MARKER, marker)
    return marker


def enclosing_marked(path: Path) -> tuple[Path, dict[str, Any]] | None:
    """The nearest strict ancestor of `path` carrying a marker, with its marker."""
    for anc in Path(path).resolve().parents:
        m = read_marker(anc)
        if m is not None:
            return anc, m
    return None


def run_id_of(path: Path) -> str | None:
    """The identity of the run folder `path` lies in (None outside any run)."""
    found = enclosing_marked(path)
    if found is None:
        return None
    return found[1]["id"] if found[1]["kind"] == "run" else found[1].get("run")


def check_publishable(path: Path, kind: str) -> None:
    """Raise unless a `kind` folder may be published at `path`: not inside a marked leaf folder
    (a model, checkpoint or export of any kind), and either absent, an empty folder, or a marked
    folder of the same kind written for the same run."""
    path = Path(path)
    found = enclosing_marked(path)
    if found is not None and found[1]["kind"] not in CONTAINER_KINDS:
        raise CheckpointError(
            f"{path} is inside {found[0]}, a {found[1]['kind']} folder elasticmoe wrote; refusing to write into it: "
            "choose an output path outside it"
        )
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder; refusing to replace it: choose another output path")
    marker = read_marker(path)
    if marker is None:
        if any(path.iterdir()):
            raise CheckpointError(
                f"{path} exists and is not a folder elasticmoe wrote (no {MARKER} marker); refusing to replace "
                "it: choose another output path or remove it yourself"
            )
        return
    if marker["kind"] != kind:
        raise CheckpointError(
            f"{path} holds a {marker['kind']} folder, not a {kind}; refusing to replace it: choose another output path"
        )
    here = run_id_of(path)
    if marker.get("run") is not None and here is not None and marker.get("run") != here:
        raise CheckpointError(f"{path} was written for another run; refusing to replace it: choose another output path")


# -- manifests -----------------------------------------------------------------------------------
def _listed_files(folder: Path) -> dict[str, Path]:
    """Every file a manifest must cover: all but the manifest itself and writers' temporaries
    (dot-files such as DCP's `.metadata` and our marker count)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if (p.is_file() or p.is_symlink()) and p.name != MANIFEST and not _is_temporary(p.name):
            out[p.relative_to(folder).as_posix()] = p
    return out


def write_manifest(folder: Path) -> None:
    files = {name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for name, p in _listed_files(folder).items()}
    write_json(Path(folder) / MANIFEST, {"files": files})


def verify_manifest(folder: Path) -> None:
    """Raise CheckpointError naming the first problem: no manifest, a malformed one, a file it lists
    that is missing or whose checksum differs, or a file in the folder that it does not list."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{folder} is incomplete: no {MANIFEST}")
    files = read_json_object(manifest).get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{manifest} lists no files: not a manifest elasticmoe wrote")
    on_disk = _listed_files(folder)
    for name, info in files.items():
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("sha256"), str)
            or not isinstance(info.get("bytes"), int)
        ):
            raise CheckpointError(f"{manifest}: entry {name!r} must be {{'sha256': str, 'bytes': int}}")
        p = on_disk.get(name)
        if p is None or p.is_symlink():
            raise CheckpointError(f"{folder / name} is missing (listed in {manifest})")
        if p.stat().st_size != info["bytes"] or sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{p} is corrupted: checksum does not match {manifest}")
    unlisted = sorted(set(on_disk) - set(files))
    if unlisted:
        raise CheckpointError(f"{folder} holds files its {MANIFEST} does not list: {unlisted[:5]}")


# -- atomic folders ------------------------------------------------------------------------------
def begin_folder(path: Path, kind: str) -> Path:
    """Check that a `kind` folder may be published at `path` and create its temporary sibling
    (mode 0777 less the umask; mkdtemp would give 0700)."""
    path = Path(path)
    clean_stale(path.parent, path.name)
    check_publishable(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(_tmp_dir_name(path.name))
    os.mkdir(tmp, 0o777)
    return tmp


def publish_folder(tmp: Path, path: Path, kind: str) -> None:
    """Mark and manifest the finished temporary folder, then rename it into place. An existing
    folder is replaced only once the new one is whole (and only if `check_publishable` allows)."""
    tmp, path = Path(tmp), Path(path)
    write_marker(tmp, kind, run=run_id_of(path))
    write_manifest(tmp)
    check_publishable(path, kind)  # again: the destination may have changed while we wrote
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)


class AtomicFolder:
    """Context manager: build a folder under a temporary name, mark and manifest it, rename it into
    place. On error the temporary folder is removed and nothing appears at `path`. `kind` names
    what the folder is ("checkpoint", "child", "elastic-parent", "hf-export", ...): see
    `check_publishable` for what may be replaced."""

    def __init__(self, path: Path | str, kind: str = "folder"):
        self.path, self.kind = Path(path), kind

    def __enter__(self) -> Path:
        self.tmp = begin_folder(self.path, self.kind)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            publish_folder(self.tmp, self.path, self.kind)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, the one way tensors are written: the file gets the umask's mode
    (save_file creates it 0600), and a full disk is an OSError (ENOSPC) saying how many bytes the
    file needed, not safetensors' own error with its Rust debug text."""
    import errno

    path = Path(path)
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as exc:
        text = str(exc)
        if "StorageFull" not in text and "os error 28" not in text and "code: 28" not in text:
            raise
        path.unlink(missing_ok=True)
        need = sum(t.numel() * t.element_size() for t in tensors.values())
        raise OSError(
            errno.ENOSPC, f"No space left on device: {path.name} needs {need / 2**20:,.1f} MiB", str(path.parent)
        ) from None
    os.chmod(path, 0o666 & ~_umask())


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_model_files(folder: Path, model, meta: dict[str, Any] | None = None) -> None:
    """Write model.safetensors and config.json into an (already temporary) folder."""
    save_tensors(state_dict_for_save(model), folder / "model.safetensors")
    write_json(
        folder / "config.json",
        {
            "format": FORMAT,
            "model": model.config.to_dict(),
            "layer_order": list(model.layer_order),
            "meta": meta or {},
        },
    )


def save_model(
    path: Path | str,
    model,
    meta: dict[str, Any] | None = None,
    extra_files: dict[str, Path] | None = None,
    kind: str | None = None,
):
    """Atomically write a complete model folder (tensors, config, optional extra files, marker,
    manifest). Its kind (what it may replace) is `kind`, else `meta["kind"]`, else "model"."""
    with AtomicFolder(path, kind or (meta or {}).get("kind") or "model") as tmp:
        save_model_files(tmp, model, meta)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
    return Path(path)


def check_weights_fit(config: ModelConfig, held: int, where: str, unit: str = "bytes", error=CheckpointError) -> None:
    """The one check every loader makes before building a model from a config read from disk:
    the parameters `config` describes must fit in what the weight files hold (`held` values, or
    bytes: every value takes at least one), so `layers: 1e9` is an error, not an allocation. A guard
    against sizes, with slack (twice what is held): which tensor is missing or misshapen is for
    the loader's own checks to name."""
    from .cost import config_params

    need = config_params(config)
    if need > 2 * held:
        raise error(
            f"{where} describes {config.layers:,} layers and {need:,} parameters, but the weight files hold "
            f"{held:,} {unit}: config.json does not describe these weights"
        )


def load_model(path: Path | str, device: str | torch.device = "cpu", verify: bool = True):
    """Load a model folder written by `save_model`. Returns (model, meta). Checksums verified."""
    from .model import ElasticMoE

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    if verify:
        verify_manifest(folder)
    cfg = read_json_object(folder / "config.json")
    if cfg.get("format") != FORMAT or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{folder / 'config.json'} is not an elasticmoe model config")
    config = ModelConfig.from_dict(cfg["model"])
    weights = folder / "model.safetensors"
    check_weights_fit(config, weights.stat().st_size if weights.is_file() else 0, str(folder / "config.json"))
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
