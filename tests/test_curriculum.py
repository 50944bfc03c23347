"""The level curriculum of the training stream (data.curriculum, issue 24): the level mix moves from
easy to hard over the run, resumes exactly, and leaves the stream untouched when off."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from elasticmoe.config import ConfigError
from elasticmoe.data import example_level
from elasticmoe.metrics import read_metrics
from elasticmoe.recipe import load_recipe
from elasticmoe.rundata import prepare_run_data
from elasticmoe.tokens import StratifiedBatches
from elasticmoe.train import train

EOS = 0
LEVELS = (1, 2, 4, 8)


def _graded_arrays() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Text, and a graded task "kv" whose documents' ids tell their level (id 200 + 10 * level + i
    % 10) and whose length grows with the level, as the real tasks' do; EOS is 0."""
    rng = np.random.default_rng(0)
    text = np.concatenate(
        [np.append(np.full(int(rng.integers(3, 12)), 100 + i % 90, np.uint16), EOS) for i in range(300)]
    )
    levels = rng.choice(LEVELS, size=800)
    docs = [
        np.append(np.full(2 + 2 * int(lv), 200 + 10 * int(lv) + i % 10, np.uint16), EOS) for i, lv in enumerate(levels)
    ]
    return {"text": text, "kv": np.concatenate(docs)}, {"kv": levels}


def _level_of(row: torch.Tensor) -> int:
    ids = {(int(v) - 200) // 10 for v in row.tolist() if v != EOS}
    assert len(ids) == 1, ids  # under the curriculum a row holds one level
    return ids.pop()


def _make(curriculum: float = 0.5, total_steps: int = 200, **kw) -> StratifiedBatches:
    arrays, levels = _graded_arrays()
    args = dict(seq_len=16, batch_size=8, seed=3, eos_id=EOS, levels=levels, curriculum=curriculum)
    return StratifiedBatches(arrays, {"text": 0.5, "kv": 0.5}, total_steps=total_steps, **{**args, **kw})


def test_level_mix_moves_from_easy_to_hard_and_reaches_every_level() -> None:
    it = _make(curriculum=0.5, total_steps=200)
    assert it.levels == {"kv": [1, 2, 4, 8]} and it.enters["kv"].tolist() == [0, 25, 50, 75]  # 0.5 * 200 * k / 4
    by_step = []
    for step in range(200):
        shares = it.level_rows_at("kv", step, 4)
        assert sum(shares.values()) == 4
        assert all(n == 0 for lv, n in shares.items() if step < it.enters["kv"][LEVELS.index(lv)])  # not yet entered
        x, _ = next(it)
        by_step.append([_level_of(row) for row in x[4:]])  # rows 4-7: the kv rows
    assert all(lv == 1 for lv in sum(by_step[:25], []))  # the easiest level alone at first
    early, late = sum(by_step[:60], []), sum(by_step[120:], [])
    assert early.count(1) / len(early) > 0.5 > late.count(1) / len(late)  # the easy share falls
    assert early.count(8) / len(early) < 0.05 < late.count(8) / len(late)  # the hard share rises
    assert set(late) == set(LEVELS)  # every level reached before the end
    # once all have entered, rows follow the levels' token shares: the level mix of the single stream
    tokens = {lv: len(s.stream) for lv, s in zip(LEVELS, it.sources["kv"])}
    for lv in LEVELS:
        assert abs(late.count(lv) / len(late) - tokens[lv] / sum(tokens.values())) < 0.05
    # the whole run at curriculum=1: the hardest level enters at 3/4, still before the last step
    assert _make(curriculum=1.0, total_steps=7).enters["kv"].tolist() == [0, 1, 3, 5]


def test_curriculum_resume_and_ranks_are_exact() -> None:
    arrays, levels = _graded_arrays()
    masks = {"kv": arrays["kv"] % 2 == 0}
    make = lambda: _make(loss_masks=masks)  # noqa: E731
    expected = [next(it) for it in [make()] for _ in range(200)]
    first = make()
    for _ in range(61):  # inside the curriculum: some levels not entered yet
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["curriculum"] == {"fraction": 0.5, "steps": 200} and set(state["tasks"]["kv"]["levels"]) == {
        "1",
        "2",
        "4",
        "8",
    }
    resumed = make()
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip([next(resumed) for _ in range(139)], expected[61:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert resumed.state_dict()["tasks"]["kv"]["levels"]["1"]["epoch"] >= 1  # crossed an epoch of a level
    # two ranks of 4 rows read exactly the rows of one process of 8
    ranks = [_make(batch_size=4, rank=r, world_size=2, loss_masks=masks) for r in range(2)]
    for x_all, y_all in expected[:80]:
        parts = [next(it) for it in ranks]
        assert torch.equal(torch.cat([x for x, _ in parts]), x_all) and torch.equal(
            torch.cat([y for _, y in parts]), y_all
        )


def _digest(it: StratifiedBatches, steps: int) -> str:
    h = hashlib.sha256()
    for _ in range(steps):
        x, y = next(it)
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


def test_off_leaves_the_stream_byte_identical() -> None:
    """With the curriculum off the batches are those of the code before it (digests taken then),
    whether or not levels are given."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_data import _task_arrays

    arrays = _task_arrays()
    masks = {"kv": arrays["kv"] % 2 == 0}
    levels = {"kv": np.ones(int((arrays["kv"] == EOS).sum()), dtype=np.int64)}
    weights = {"text": 0.5, "kv": 0.3, "sort": 0.2}
    for kw in ({}, {"curriculum": 0.0, "levels": levels, "total_steps": 100}):
        one = StratifiedBatches(arrays, weights, 16, 4, seed=3, eos_id=EOS, loss_masks=masks, **kw)
        assert _digest(one, 120) == "43d7b3b5be4adbe4"
        rank1 = StratifiedBatches(arrays, weights, 16, 4, 3, 1, 2, eos_id=EOS, loss_masks=masks, **kw)
        assert _digest(rank1, 120) == "21509343f521030f"
        assert "curriculum" not in one.state_dict() and "levels" not in one.state_dict()["tasks"]["kv"]


def test_bad_values_are_refused_naming_the_knob(tmp_path) -> None:
    for value in ("1.5", "-0.1", "abc", "true"):
        with pytest.raises(ConfigError, match="data.curriculum") as exc:
            load_recipe("micro", [f"data.curriculum={value}"])
        assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="data.curriculum=0.5 needs graded tasks"):
        load_recipe("micro", ["data.curriculum=0.5", "data.source=files", f"data.paths=['{tmp_path}/*.txt']"])
    with pytest.raises(ConfigError, match="data.curriculum"):
        _make(curriculum=2.0)
    with pytest.raises(ConfigError, match=r"data.curriculum=0.5 needs the run's total steps"):
        _make(total_steps=None)
    on = _make()
    next(on)
    arrays, _ = _graded_arrays()
    off = StratifiedBatches(arrays, {"text": 0.5, "kv": 0.5}, 16, 8, 3, eos_id=EOS)
    with pytest.raises(ConfigError, match="curriculum"):  # a resume under another curriculum, or none
        off.load_state_dict(on.state_dict())
    with pytest.raises(ConfigError, match="curriculum"):
        on.load_state_dict(off.state_dict())
    with pytest.raises(ConfigError, match="curriculum"):
        _make(total_steps=300).load_state_dict(on.state_dict())


def test_run_data_curriculum_on_the_embedded_corpus(tmp_path) -> None:
    """Real examples: at the first step every structured row holds level-1 examples only; late, the
    hard levels are read; a training run with the curriculum resumes exactly."""
    r = load_recipe("micro", ["model.max_seq_len=128", "data.seq_len=128"])
    data = prepare_run_data(r, tmp_path / "run")
    plain, off = (
        data.train_batches(8, 0, loss_on="answers"),
        data.train_batches(8, 0, loss_on="answers", curriculum=0.0),
    )
    assert _digest(plain, 5) == _digest(off, 5)
    it = data.train_batches(8, 0, curriculum=0.5, total_steps=40)
    seen: dict[str, set[int]] = {}
    for step in range(40):
        rows = it.rows_at(step)
        x, _ = next(it)
        first = 0
        for task, n in rows.items():
            for row in x[first : first + n]:
                docs = data.tokenizer.decode(row.tolist()).split("<|endoftext|>")[1:-1]  # whole examples
                levels = {example_level(task, d) for d in docs if task != "text"}
                assert len(levels) <= 1
                if step == 0 and levels:
                    assert levels == {min(it.levels[task])}
                if step >= 30:
                    seen.setdefault(task, set()).update(levels)
            first += n
    assert all(max(seen[t]) == max(it.levels[t]) for t in ("kv", "arith", "sort"))  # find: long rows, cut
    over = ["train.steps=8", "train.ckpt_every=3", "train.eval_every=8", "data.curriculum=0.5", "reorder.at_steps=[]"]
    r = load_recipe("micro", over)
    train(r, tmp_path / "a", progress=False)
    train(r, tmp_path / "b", progress=False, stop_at=5)  # checkpoint at 3: resumes inside the curriculum
    train(r, tmp_path / "b", resume=True, progress=False)
    losses = [[m["loss"] for m in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in m] for d in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) >= 2


def test_runs_from_trained_weights_have_no_curriculum() -> None:
    """Fine-tunes and the retrofit's elastic phase start from trained weights: every level at once."""
    from elasticmoe.phases import _finetune_recipe, retrofit_recipe
    from elasticmoe.recipe import DistillConfig

    r = load_recipe("micro", ["data.curriculum=0.5"])
    assert retrofit_recipe(r, 10, 1e-3).data.curriculum == 0.0
    ft = _finetune_recipe(r, r.model, DistillConfig(), {"kv": 1.0}, 1e-3, 10, 4, 5, "cpu")
    assert ft.data.curriculum == 0.0 and ft.data.task_weights == {"kv": 1.0}
