"""Intra-op threads that make room when other processes need the cores (issue 23, part 5).

torch's CPU kernels run on a pool of OpenMP threads that wait for each other at the end of every
parallel region, spinning while they wait. When another busy process shares the cores, one of the
pool's threads keeps losing its core to it and every region waits for that thread: measured on the
2-core machine (`bench/bench_threads.py`), a tiny-preset elastic step at 2 threads went from 0.31 s
to 0.95-1.3 s beside one single-thread busy process and to 4-10 s beside two, while the same step on
1 thread took 0.45-0.49 s beside one.

`ThreadGovernor` watches, every few seconds, how much CPU time the other processes took on the
cores this process may use (/proc/stat minus this process's own time) and sets torch's thread
count to the cores they leave free, between 1 and the count the process started with. It needs
Linux's /proc/stat; elsewhere, on an accelerator, with one thread to begin with, or with
`ELASTICMOE_THREADS=fixed` it changes nothing.

Thread count changes the order of floating-point reductions, so runs with different counts differ
in the last bits (about 1e-7 in the weights after a few steps). Resume is bit-exact when the
thread count is fixed (`ELASTICMOE_THREADS=fixed`, or `OMP_NUM_THREADS=1` as the tests use).
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch

log = logging.getLogger(__name__)

ENV = "ELASTICMOE_THREADS"  # "fixed": never change torch's thread count
SLACK = 0.25  # cores another process may use before this one gives up a thread


def _busy_seconds(cpus: set[int]) -> float | None:
    """CPU seconds spent busy (not idle, not waiting for I/O) on `cpus` since boot; None where
    /proc/stat is not readable."""
    try:
        with open("/proc/stat") as f:
            text = f.read()
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = 0
    for line in text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        busy += user + nice + system + irq + softirq + steal
    return busy / hz


def threads_for(free_cores: float, most: int) -> int:
    """The thread count for `free_cores` cores left by other processes: a thread for each free
    core (a core counts when others use at most `SLACK` of it), at least 1, at most `most`."""
    return max(1, min(most, math.floor(free_cores + SLACK)))


class ThreadGovernor:
    """A context manager; call `tick()` once per step: every `every_s` seconds it re-reads the
    machine's load and sets torch's intra-op thread count (see the module's docstring)."""

    def __init__(self, device: torch.device, every_s: float = 5.0):
        self.most = torch.get_num_threads()
        self.every_s = every_s
        self.cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
        self.enabled = (
            device.type == "cpu"
            and self.most > 1
            and os.environ.get(ENV, "auto").lower() != "fixed"
            and _busy_seconds(self.cpus) is not None
        )
        self.last = self._sample() if self.enabled else None

    def _sample(self) -> tuple[float, float, float]:
        return time.monotonic(), _busy_seconds(self.cpus) or 0.0, time.process_time()

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def tick(self) -> int:
        """Re-decide when `every_s` has passed; returns the thread count in use."""
        if not self.enabled:
            return self.threads
        now = time.monotonic()
        if now - self.last[0] < self.every_s:
            return self.threads
        wall, busy, own = self._sample()
        others = max(0.0, (busy - self.last[1]) - (own - self.last[2])) / max(wall - self.last[0], 1e-9)
        self.last = (wall, busy, own)
        want = threads_for(len(self.cpus) - others, self.most)
        if want != self.threads:
            log.info(
                "threads %d -> %d: other processes used %.1f of %d cores", self.threads, want, others, len(self.cpus)
            )
            torch.set_num_threads(want)
        return want

    def __enter__(self) -> ThreadGovernor:
        return self

    def __exit__(self, *exc) -> None:
        """Give the process back the thread count it started with."""
        if self.enabled and self.threads != self.most:
            torch.set_num_threads(self.most)
