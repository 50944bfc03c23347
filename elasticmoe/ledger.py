"""The cost ledger: one JSON line per unit of work, appended atomically to `RUN_DIR/ledger.jsonl`.

Each phase writes a `start` record when it begins and an `end` record when it finishes
(status `ok` or `crashed`); long phases also write `progress` records (training: one per
checkpoint interval, so a resumed run never counts a step twice; the work lost between the
last checkpoint and a crash, at most `ckpt_every` steps, is not recorded). Only `progress` and
`end` records carry tokens/FLOPs/seconds; sums are over those. FLOPs come from `cost.py`.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line (power cut): end it first
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return record

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a torn last line from a power cut: ignore it
                    continue
        return out

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


def sum_work(records: list[dict[str, Any]], **match: Any) -> dict[str, float]:
    """Tokens, FLOPs and device-seconds (wall seconds x world size) of the `progress` and `end`
    records whose fields equal `match`. An `end` record that only states a phase's wall time
    (`phase_seconds`, its work being in `progress` records) adds nothing."""
    tot = {"tokens": 0, "flops": 0, "seconds": 0.0}
    for r in records:
        if r.get("event") not in ("progress", "end") or "phase_seconds" in r:
            continue
        if all(r.get(k) == v for k, v in match.items()):
            tot["tokens"] += r.get("tokens", 0) or 0
            tot["flops"] += r.get("flops", 0) or 0
            tot["seconds"] += (r.get("seconds", 0) or 0) * int(r.get("world_size", 1) or 1)
    return tot
