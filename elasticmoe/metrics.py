"""A run's step log: metrics.jsonl (one JSON line per logged step or evaluation), the loss-curve
PNG drawn from it, and the progress display (a rich bar on a terminal, log lines with ETA
elsewhere)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write_text
from .jsonl import append_record, read_records

log = logging.getLogger("elasticmoe.train")


def _append_metrics(path: Path, rec: dict) -> None:
    append_record(path, rec, fsync=False)  # one line per step: the checkpoint, not this log, is the state


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume from `step`: keep the records up to it (damaged lines dropped, with a warning),
    rewritten atomically, so a kill during the rewrite leaves the old file whole."""
    if not Path(path).exists():
        return
    keep = [r for r in read_metrics(path) if _step(r) <= step]
    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in keep))


def _step(rec: dict) -> float:
    s = rec.get("step", 0)
    return s if isinstance(s, (int, float)) else float("inf")


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; damaged lines (a kill mid-write) are logged and skipped."""
    records, problems = read_records(path)
    for p in problems:
        log.warning("%s: damaged record skipped (%s)", path, p)
    return records


def _mean_tok_per_s(path: Path) -> float:
    vals = [r["tok_per_s"] for r in read_metrics(path) if "tok_per_s" in r]
    vals = vals[len(vals) // 10 :]  # skip warm-up steps
    return float(np.median(vals)) if vals else 0.0


def _plot_losses(metrics: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("largest", "smallest"):
        pts = [(r["step"], r["loss"][name]) for r in recs if "loss" in r and name in r["loss"]]
        if pts:
            ax.plot(*zip(*pts), label=f"train CE, {name}", alpha=0.8)
    for name in ("largest", "smallest"):
        pts = [
            (r["step"], float(np.mean(list(r["val"][name].values())))) for r in recs if "val" in r and name in r["val"]
        ]
        if pts:
            ax.plot(*zip(*pts), "o--", label=f"val CE (task mean), {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.set_title("elastic training")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


class _Progress:
    """A rich progress bar with ETA, or plain log lines when disabled/not a terminal."""

    def __init__(self, total: int, start: int, enabled: bool, every: int = 10):
        self.total, self.enabled, self.bar, self.every = total, enabled, None, every
        self.start, self.t0 = start, time.perf_counter()
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, loss: float, lr: float, dt: float, n: int) -> None:
        info = f"loss {loss:.3f} | lr {lr:.1e} | {dt * 1000:.0f} ms | {n} subnets"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(step - self.start, 1) * (self.total - step)
            log.info("step %d/%d | %s | eta %dm%02ds", step, self.total, info, eta // 60, eta % 60)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
