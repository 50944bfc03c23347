"""The thread governor gives up threads while other processes take the cores, and takes them back."""

import pytest
import torch

from elasticmoe import threads as thr


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class FakeMachine:
    """Two cores; `others` is how many cores other processes keep busy, `own` this process's."""

    def __init__(self, monkeypatch):
        self.t, self.busy, self.own_s = 0.0, 0.0, 0.0
        monkeypatch.setattr(thr, "_busy_seconds", lambda cpus: self.busy)
        monkeypatch.setattr(thr.time, "monotonic", lambda: self.t)
        monkeypatch.setattr(thr.time, "process_time", lambda: self.own_s)
        monkeypatch.setattr(thr.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)

    def run(self, seconds: float, others: float, own: float) -> None:
        self.t += seconds
        self.busy += seconds * (others + own)
        self.own_s += seconds * own


def test_threads_for():
    assert thr.threads_for(2.0, 2) == 2
    assert thr.threads_for(1.8, 2) == 2  # others' 0.2 of a core is background noise
    assert thr.threads_for(1.33, 2) == 1  # one busy process sharing the cores with 2 threads
    assert thr.threads_for(0.0, 2) == 1  # never fewer than one
    assert thr.threads_for(7.9, 4) == 4  # never more than the process started with


def test_governor_follows_the_load(monkeypatch, two_threads):
    monkeypatch.delenv(thr.ENV, raising=False)
    m = FakeMachine(monkeypatch)
    with thr.ThreadGovernor(torch.device("cpu"), every_s=5.0) as g:
        assert g.enabled and g.tick() == 2
        m.run(3.0, others=0.7, own=1.3)
        assert g.tick() == 2  # not yet time to decide
        m.run(3.0, others=0.7, own=1.3)  # a busy process beside our 2 threads
        assert g.tick() == 1 and torch.get_num_threads() == 1
        m.run(6.0, others=1.0, own=1.0)  # still busy: stays on one thread
        assert g.tick() == 1
        m.run(6.0, others=0.05, own=1.0)  # the other process ended
        assert g.tick() == 2
        m.run(6.0, others=0.7, own=1.3)
        assert g.tick() == 1
    assert torch.get_num_threads() == 2  # leaving gives the process its threads back


def test_governor_can_be_pinned(monkeypatch, two_threads):
    m = FakeMachine(monkeypatch)
    monkeypatch.setenv(thr.ENV, "fixed")
    g = thr.ThreadGovernor(torch.device("cpu"), every_s=1.0)
    m.run(6.0, others=2.0, own=0.5)
    assert not g.enabled and g.tick() == 2
    monkeypatch.delenv(thr.ENV)
    monkeypatch.setattr(thr, "_busy_seconds", lambda cpus: None)  # no /proc/stat
    assert not thr.ThreadGovernor(torch.device("cpu")).enabled


def test_one_thread_leaves_it_alone(monkeypatch):
    FakeMachine(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert not thr.ThreadGovernor(torch.device("cpu")).enabled
    finally:
        torch.set_num_threads(before)
