"""Run folders: whose they are, who is writing into them, and where outputs may go.

* Ownership. A run folder is elasticmoe's only when it carries elasticmoe's marker
  (`.elasticmoe.json`, kind "run", with the run's identity): `claim` creates it in a new or empty
  folder, accepts a folder that has it, and refuses any other non-empty folder (a project folder
  holding a user's `data/` or `metrics.jsonl` is never adopted, so nothing of it is deleted).
* The lock. `lock(run_dir)` holds an exclusive `fcntl.flock` on `RUN_DIR/.elasticmoe.lock` for as
  long as a command writes into the run; a second writer gets a one-line ConfigError naming the
  holder. The kernel drops the lock when its holder dies (kill -9 included): no stale lock files.
  Reentrant within a process (the pipeline calls stages that lock the same run). A run on a
  read-only mount needs no lock (nothing can write into it): commands that only read it (`eval`,
  `extract` with `--out` elsewhere) run, and their ledger records are skipped with a warning.
* Paths. `check_separate` refuses an output inside an input (or an input inside the output), so no
  command writes into a user's data folder or over what it reads.
* Outputs inside a run belong to that run. `output_run` finds the run folder an output path lies in
  (symlinks resolved) and refuses the output unless every input of the command comes from that run
  and the path is not one that `elasticmoe run` recorded in its `pipeline.json` (replacing it would
  leave the run's pipeline state and report describing the old folder); the caller then holds
  that run's lock while it writes.
"""

from __future__ import annotations

import errno
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
                if fd >= 0:
                    os.close(fd)  # releases the flock


def _acquire(run_dir: Path, key: str, command: str) -> None:
    path = run_dir / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno == errno.EROFS:  # a read-only mount: nobody can write into it, so no lock is needed
            with _held_guard:
                _held[key] = (-1, 1)
            return
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


def output_run(out: Path | str, sources: Iterable[Path | str | None], what: str = "--out") -> Path | None:
    """The run folder `out` lies in (nearest marked or legacy run folder above it, symlinks resolved),
    or None outside any run. Raises a ConfigError unless every one of `sources` (the folders the
    command reads its model or data from) lies in that same run, and unless `out` is free of the
    outputs `elasticmoe run` recorded in that run's pipeline.json."""
    target = Path(out).resolve()
    run = next((a for a in target.parents if _is_run_folder(a)), None)
    if run is None:
        return None
    for src in sources:
        if src is not None and str(src) != "" and not _inside(Path(src).resolve(), run):
            raise ConfigError(
                f"{what} {out} lies inside the run folder {run}, but {src} is not from that run: a run holds only "
                "its own outputs; write this one outside it"
            )
    for recorded in _pipeline_outputs(run):
        if _inside(target, recorded) or _inside(recorded, target):
            raise ConfigError(
                f"{what} {out} would replace {recorded}, which `elasticmoe run` recorded in {run / 'pipeline.json'} "
                "(its report describes it): choose another --out"
            )
    return run


def _is_run_folder(path: Path) -> bool:
    marker = read_marker(path)
    return (marker is not None and marker["kind"] == RUN) or (marker is None and _legacy_run(path, resuming=False))


def _pipeline_outputs(run: Path) -> list[Path]:
    """The folders `elasticmoe run` recorded as phase outputs in RUN/pipeline.json (values under "dir")."""
    try:
        state = json.loads((run / "pipeline.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return []
    phases = state.get("phases") if isinstance(state, dict) else None
    if not isinstance(phases, dict):
        return []
    found = [
        run / "eval" / name
        for phase, name in (("eval", "results.json"), ("baseline", "baseline.json"))
        if phase in phases
    ]
    todo: list = [phases]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            if isinstance(node.get("dir"), str):
                found.append(_recorded_path(run, Path(node["dir"])))
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return [p.resolve() for p in found]


def _recorded_path(run: Path, path: Path) -> Path:
    """A path pipeline.json recorded relative to the working directory of `elasticmoe run`, found
    under the run folder wherever that was (`runs/a/children/x` -> RUN/children/x)."""
    if path.is_absolute():
        return path
    for i in range(len(path.parts)):
        if (run / Path(*path.parts[i:])).exists():
            return run / Path(*path.parts[i:])
    return run / path


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
