"""Shared fixtures: a tiny model config, the command line (in a subprocess or in this process), the
one-line error check, and micro runs trained for a test module."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from elasticmoe.config import ModelConfig

torch.set_num_threads(1)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def tiny_config() -> ModelConfig:
    """A model small enough for sub-second tests, with every elastic dimension > 1."""
    return ModelConfig(
        vocab_size=97,
        d_model=32,
        layers=3,
        heads=4,
        kv_heads=2,
        head_dim=8,
        experts=4,
        top_k=2,
        expert_width=24,
        max_seq_len=64,
    )


def run_cli(*args, ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m elasticmoe ARGS` in a fresh process (what a user runs); with `ok` it must exit 0."""
    res = subprocess.run(
        [sys.executable, "-m", "elasticmoe", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout
    )
    if ok:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def assert_one_line_error(res, needle: str) -> None:
    """Exit code 2, no traceback, exactly one `error:` line, and it names `needle`."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and needle in errors[0], res.stderr


@pytest.fixture(scope="session")
def cli():
    """The command line in a subprocess: `cli("search", run, "--max-params-ratio", "1/3")`."""
    return run_cli


@pytest.fixture(scope="session")
def one_line_error():
    return assert_one_line_error


@pytest.fixture(scope="session")
def cli_main():
    """The command line in this process (faster; output through capsys): `cli_main("info", ...)`."""
    from elasticmoe import cli as climod

    return lambda *args: climod.main([str(a) for a in args])


def _train_micro(path, *overrides: str):
    from elasticmoe.recipe import load_recipe
    from elasticmoe.train import train

    train(load_recipe("micro", list(overrides)), path, progress=False)
    return path


@pytest.fixture(scope="session")
def train_micro():
    """`train_micro(path, "train.steps=30", ...)`: a micro-preset run trained into `path` (no
    progress bar) with recipe overrides; returns `path`."""
    return _train_micro


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """A micro run of 30 elastic steps, shared by the tests of one module (they may add to it)."""
    path = tmp_path_factory.mktemp("micro") / "run"
    return _train_micro(path, "train.steps=30", "train.eval_every=30", "train.ckpt_every=30")
