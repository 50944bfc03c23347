"""Run folders: whose they are, who is writing into them, and where outputs may go.

* Ownership. A run folder is elasticmoe's only when it carries elasticmoe's marker
  (`.elasticmoe.json`, kind "run", with the run's identity): `claim` creates it in a new or empty
  folder, accepts a folder that has it, and refuses any other non-empty folder (a project folder
  holding a user's `data/` or `metrics.jsonl` is never adopted, so nothing of it is deleted).
* The lock. `lock(run_dir)` holds an exclusive `fcntl.flock` on `RUN_DIR/.elasticmoe.lock` for as
  long as a command writes into the run; a second writer gets a one-line ConfigError naming the
  holder. The kernel drops the lock when its holder dies (kill -9 included): no stale lock files.
  Reentrant within a process (the pipeline calls stages that lock the same run).
* Paths. `check_separate` refuses an output inside an input (or an input inside the output), so no
  command writes into a user's data folder or over what it reads.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import MARKER, clean_stale, read_marker, write_marker
from .config import ConfigError

LOCK = ".elasticmoe.lock"
RUN = "run"
_held: dict[str, tuple[int, int]] = {}  # resolved run folder -> (fd, depth): the locks this process holds
_held_guard = threading.Lock()


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def claim(run_dir: Path | str, create: bool = True) -> bool:
    """Make sure `run_dir` is an elasticmoe run folder (see the module docstring). Returns True
    when this call created the folder (so a failing command may remove it again)."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise ConfigError(f"{run_dir} exists and is not a folder: choose another output path")
    marker = read_marker(run_dir) if run_dir.is_dir() else None
    if marker is not None:
        if marker["kind"] != RUN:
            raise ConfigError(f"{run_dir} is a {marker['kind']} folder elasticmoe wrote, not a run folder")
        return False
    if run_dir.is_dir() and _legacy_run(run_dir, resuming=not create):
        write_marker(run_dir, RUN)  # a run written before markers existed: adopt it
        return False
    if run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir()):
        raise ConfigError(
            f"{run_dir} is not empty and is not an elasticmoe run folder (no {MARKER} marker): refusing to write "
            "into it. Choose a new --out, or an empty folder"
        )
    if not create:
        raise ConfigError(f"{run_dir} is not an elasticmoe run folder")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output folder {run_dir} is not writable: {exc.strerror}") from None
    write_marker(run_dir, RUN)
    return created


def _legacy_run(run_dir: Path, resuming: bool) -> bool:
    """A run folder written by a version without markers: its recipe and ledger (or, when resuming,
    its recipe or checkpoints) are there."""
    recipe, ledger = (run_dir / "recipe.yaml").is_file(), (run_dir / "ledger.jsonl").is_file()
    return (recipe and ledger) or (resuming and (recipe or (run_dir / "checkpoints").is_dir()))


def looks_like_run(run_dir: Path) -> bool:
    return (
        read_marker(run_dir) is not None or _legacy_run(run_dir, resuming=True) or (run_dir / "ledger.jsonl").is_file()
    )


def run_identity(run_dir: Path | str) -> str | None:
    marker = read_marker(Path(run_dir))
    return marker["id"] if marker is not None and marker["kind"] == RUN else None


@contextmanager
def lock(run_dir: Path | str, command: str = "elasticmoe") -> Iterator[Path]:
    """Hold the run folder's write lock (exclusive, non-blocking: a second writer fails at once
    with a ConfigError naming the holder). Under torchrun only rank 0 takes it. While held, the
    temporaries killed writers left in the run folder are removed (none can be a live writer's)."""
    run_dir = Path(run_dir)
    if not _is_main_rank():
        yield run_dir
        return
    if not run_dir.is_dir() or not looks_like_run(run_dir):  # never leave a lock file in a user's folder
        raise ConfigError(f"{run_dir} is not an elasticmoe run folder")
    key = str(run_dir.resolve())
    with _held_guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            reentered = True
        else:
            reentered = False
    if not reentered:
        _acquire(run_dir, key, command)
    try:
        yield run_dir
    finally:
        with _held_guard:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
                os.close(fd)  # releases the flock


def _acquire(run_dir: Path, key: str, command: str) -> None:
    path = run_dir / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise ConfigError(f"cannot lock {run_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (ValueError, UnicodeDecodeError):
            holder = {}
        os.close(fd)
        who = f" ({holder.get('command', 'elasticmoe')}, pid {holder.get('pid', '?')})" if holder else ""
        raise ConfigError(
            f"{run_dir} is in use by another elasticmoe command{who}: wait for it to finish, or use another folder"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command}).encode(), 0)
    with _held_guard:
        _held[key] = (fd, 1)
    clean_stale(run_dir)
    clean_stale(run_dir / "checkpoints")
    for p in (run_dir / "checkpoints").glob(".step-*"):  # half-written checkpoints of killed runs
        shutil.rmtree(p, ignore_errors=True)


@contextmanager
def writing(run_dir: Path | str, command: str, create: bool = True) -> Iterator[Path]:
    """`claim` + `lock` for a command that writes a run folder. If this call created the folder
    and the command fails before any checkpoint exists, the folder is removed again: bad input
    leaves nothing behind."""
    run_dir = Path(run_dir)
    created = _is_main_rank() and claim(run_dir, create=create)
    try:
        with lock(run_dir, command):
            yield run_dir
    except BaseException:
        if created and not (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _root(pattern: str) -> Path:
    """The fixed leading part of a path or glob pattern (what a glob can only ever be under)."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]]
    return Path(*fixed) if fixed else Path(".")


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_separate(out: Path | str, inputs: Iterable[Path | str | None], what: str = "--out") -> None:
    """Refuse an output path equal to, inside, or containing any of `inputs` (paths or globs)."""
    o = Path(out).resolve()
    for item in inputs:
        if item is None or str(item) == "":
            continue
        i = _root(str(item)).resolve()
        if _inside(o, i):
            raise ConfigError(f"{what} {out} lies inside the input {item}: refusing to write into an input")
        if _inside(i, o):
            raise ConfigError(f"the input {item} lies inside {what} {out}: choose an output folder apart from inputs")


def recipe_inputs(recipe) -> list[str]:
    """Every path a recipe reads: data files and globs, held-out shards, tokenizer, init weights."""
    d = recipe.data
    return [*d.paths, *d.eval_paths, d.tokenizer, recipe.train.init_from]
