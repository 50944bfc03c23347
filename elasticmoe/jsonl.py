"""Append-only JSON-lines files (metrics.jsonl, ledger.jsonl) that survive torn writes.

A record is one line written by one `write` on an O_APPEND descriptor, so concurrent writers never
interleave within a line. A line torn by a kill or power cut is ended before the next record is
appended, so it damages only itself. Reading never fails on a damaged line: it is returned as a
problem ("line N: why") for the caller to report, never silently dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def append_record(path: Path | str, record: dict[str, Any], fsync: bool = True) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line: end it first
            line = b"\n" + line
        os.write(fd, line)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: Path | str) -> tuple[list[dict[str, Any]], list[str]]:
    """(records, problems): every line that parses as a JSON object, and one "line N: why" for
    each line that does not (torn, corrupted, not UTF-8, not an object)."""
    path = Path(path)
    if not path.is_file():
        return [], []
    records, problems = [], []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            problems.append(f"line {n}: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        if not isinstance(rec, dict):
            problems.append(f"line {n}: a JSON {type(rec).__name__}, not an object")
            continue
        records.append(rec)
    return records, problems
