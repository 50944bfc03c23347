"""The cost ledger: one JSON line per unit of work, appended atomically to `RUN_DIR/ledger.jsonl`.

Exactness. Every unit of work has an idempotent key (`work_key`): a training segment is
(phase, run, step range), a periodic evaluation or re-ordering (phase, run, step), and any record
may carry an explicit `key`. Sums count each key once, so a resume that redoes a segment, a
re-run closing evaluation, or a record written again after a kill never double-counts; damaged
lines are returned by `Ledger.problems()` (and shown by `report`), never silently dropped.

Each phase writes a `start` record when it begins and an `end` record when it finishes
(status `ok` or `crashed`); long phases also write `progress` records (training: one per
checkpoint interval, so a resumed run never counts a step twice; the work lost between the
last checkpoint and a crash, at most `ckpt_every` steps, is not recorded). Only `progress` and
`end` records carry tokens/FLOPs/seconds; sums are over those. FLOPs come from `cost.py`.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .jsonl import append_record, read_records

log = logging.getLogger(__name__)
_READ_ONLY_WARNED: set[Path] = set()


class Ledger:
    def __init__(self, path: Path | str):
        self.path = Path(path)

    def ref(self, path: Path | str) -> str:
        """How records name a folder: relative to the ledger's own folder when inside it, so a run
        folder can be moved or copied (or phases run on another machine) and still add up."""
        p, base = Path(path).resolve(), self.path.parent.resolve()
        try:
            return p.relative_to(base).as_posix() or "."
        except ValueError:
            return str(p)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """One line, one `write` on an O_APPEND descriptor, then fsync: lines never interleave."""
        record = {"time": time.time(), **record}
        try:
            append_record(self.path, record)
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            if self.path not in _READ_ONLY_WARNED:  # a run on a read-only mount, read by eval or extract
                _READ_ONLY_WARNED.add(self.path)
                log.warning("%s is on a read-only file system: this command's work is not recorded there", self.path)
        return record

    def append_once(self, record: dict[str, Any]) -> bool:
        """Append `record` unless one with the same `work_key` is already there (True if written):
        how a resume records a segment its checkpoint holds but a kill kept out of the ledger."""
        key = work_key(record)
        if key is not None and any(work_key(r) == key for r in self.records()):
            return False
        self.append(record)
        return True

    def records(self) -> list[dict[str, Any]]:
        return self.read()[0]

    def problems(self) -> list[str]:
        """The damaged lines ("line N: why"): work they held is missing from every sum."""
        return self.read()[1]

    def read(self) -> tuple[list[dict[str, Any]], list[str]]:
        """(records, problems); a record whose work fields are not numbers counts as damaged."""
        records, problems = read_records(self.path)
        good = []
        for r in records:
            bad = [k for k in _NUMBERS if k in r and not _is_number(r[k])]
            if bad:
                problems.append(f"record at time {r.get('time')!r}: {bad} must be numbers")
            else:
                good.append(r)
        return good, problems

    def totals(self, phase: str | None = None, **match: Any) -> dict[str, float]:
        """Sum tokens, FLOPs and device-seconds over this ledger's records (see `sum_work`)."""
        return sum_work(self.records(), **({"phase": phase} if phase is not None else {}), **match)

    def finished(self, phase: str, **match: Any) -> bool:
        return any(
            r.get("event") == "end"
            and r.get("status") == "ok"
            and r.get("phase") == phase
            and all(r.get(k) == v for k, v in match.items())
            for r in self.records()
        )

    @contextmanager
    def phase(self, phase: str, device: str = "cpu", world_size: int = 1, counted: bool = True, **fields: Any):
        """Record start/end of a phase. The body adds work to the yielded dict:
        `rec["tokens"] += n`, `rec["flops"] += f`; seconds are measured here. With
        `counted=False` the body writes its own `progress` records and the end record only
        states the phase's wall time (as `phase_seconds`, not summed)."""
        pid = uuid.uuid4().hex[:12]
        base = {
            "phase": phase,
            "phase_id": pid,
            "device": device,
            "world_size": world_size,
            "host": socket.gethostname(),
            **fields,
        }
        self.append({**base, "event": "start"})
        rec: dict[str, Any] = {"tokens": 0, "flops": 0}
        t0 = time.perf_counter()
        try:
            yield rec
        except BaseException as exc:
            self._end(base, rec, counted, t0, status="crashed", error=repr(exc)[:300])
            raise
        self._end(base, rec, counted, t0, status="ok")

    def _end(self, base: dict, rec: dict, counted: bool, t0: float, **extra: Any) -> None:
        elapsed = time.perf_counter() - t0
        work = {**rec, "seconds": elapsed} if counted else {"phase_seconds": elapsed}
        self.append({**base, **work, "event": "end", **extra})


_NUMBERS = ("tokens", "flops", "seconds", "world_size")


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def work_key(record: dict[str, Any]) -> tuple | None:
    """The idempotent key of a unit of work, or None for work that is counted every time it is
    recorded (an evaluation the user asked for twice). A record's own `key` wins (a search carries
    one: the same search redone after a kill counts once); a
    training segment is (phase, run, first step, last step); a periodic evaluation or re-ordering
    (phase, run, step)."""
    if record.get("key") is not None:
        return ("key", str(record["key"]))
    steps = record.get("steps")
    if record.get("event") == "progress" and isinstance(steps, list) and len(steps) == 2:
        return ("segment", record.get("phase"), record.get("run"), *steps)
    if record.get("event") == "end" and record.get("phase") in ("train-eval", "importance") and "step" in record:
        return ("at-step", record.get("phase"), record.get("run"), record["step"])
    return None


# a fine-tune's work: its training and the validation passes its best-state choice needs
FINETUNE_PHASES = ("finetune", "finetune-eval")


def sum_work(records: list[dict[str, Any]], phases: tuple[str, ...] | None = None, **match: Any) -> dict[str, float]:
    """Tokens, FLOPs and device-seconds (wall seconds x world size) of the `progress` and `end`
    records whose fields equal `match` (and whose phase is one of `phases`, when given), each
    `work_key` counted once (its first record). An `end` record that only states a phase's wall
    time (`phase_seconds`, its work being in `progress` records) adds nothing."""
    tot = {"tokens": 0, "flops": 0, "seconds": 0.0}
    seen: set[tuple] = set()
    for r in records:
        if r.get("event") not in ("progress", "end") or "phase_seconds" in r:
            continue
        if (phases is None or r.get("phase") in phases) and all(r.get(k) == v for k, v in match.items()):
            key = work_key(r)
            if key is not None:
                if key in seen:
                    continue
                seen.add(key)
            tot["tokens"] += r.get("tokens", 0) or 0
            tot["flops"] += r.get("flops", 0) or 0
            tot["seconds"] += (r.get("seconds", 0) or 0) * int(r.get("world_size", 1) or 1)
    return tot
