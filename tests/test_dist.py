"""Data-parallel training under torchrun (gloo, 2 CPU processes): same losses as one process, exact
resume, sharded checkpoints loadable at another world size, divergence and NaN agreement.

Tolerance for "the same losses": 1e-5 relative. Two ranks compute the same sums in another order
(per-rank means averaged, all-reduce / reduce-scatter of fp32 gradients), so results differ by
float32 rounding; measured at most ~1.5e-7 relative over 8 steps of the micro preset. The
load-balance auxiliary loss is computed per rank (see dist.py), so these runs set aux_weight=0
to compare the same function of the data (with it on, the gap was ~7e-4 after 8 steps).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from elasticmoe import dist as distmod
from elasticmoe import train as trainmod
from elasticmoe.checkpoint import CheckpointError, load_model, read_json, verify_manifest, write_manifest
from elasticmoe.config import ConfigError
from elasticmoe.ledger import Ledger
from elasticmoe.metrics import read_metrics
from elasticmoe.recipe import load_recipe
from elasticmoe.subnet import Subnet

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _hook in (distmod.TEST_DIVERGE_ENV, distmod.TEST_NAN_ENV):
    ENV.pop(_hook, None)
STEPS = 8
ARGS = [
    "--config",
    "micro",
    "--set",
    f"train.steps={STEPS}",
    "--set",
    "train.ckpt_every=4",
    "--set",
    "reorder.at_steps=[3]",  # re-ordering mid-run: exercises the gather / re-order / re-shard path
    "--set",
    "train.aux_weight=0",
    "--quiet",
]
RTOL = 1e-5


def _single(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "elasticmoe", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def _torchrun(*args: str, env: dict | None = None, timeout: int = 240, console_script: bool = False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    script = Path(sys.executable).parent / "elasticmoe"
    if console_script and script.is_file():
        target = ["--no-python", str(script)]
    else:
        target = ["-m", "elasticmoe"]
    cmd = [*launcher, *target, "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=timeout)


def _losses(run: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def _assert_close(got: dict, want: dict, rtol: float) -> None:
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step].keys() == want[step].keys(), step
        for name, value in want[step].items():
            assert got[step][name] == pytest.approx(value, rel=rtol), (step, name, got[step][name], value)


def _interrupted_copy(src: Path, dst: Path) -> Path:
    """The run as if killed after its step-4 checkpoint: later checkpoints and the parent removed."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / f"step-{STEPS:06d}")
    shutil.rmtree(dst / "parent")
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    out = {"single": root / "single", "ddp": root / "ddp", "fsdp": root / "fsdp"}
    res = _single(*ARGS, "--out", str(out["single"]))
    assert res.returncode == 0, res.stderr[-3000:]
    for mode in ("ddp", "fsdp"):
        res = _torchrun(*ARGS, "--parallel", mode, "--out", str(out[mode]), console_script=mode == "ddp")
        assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_like_one_with_the_same_global_batch(runs, mode):
    _assert_close(_losses(runs[mode]), _losses(runs["single"]), RTOL)
    one, two = read_json(runs["single"] / "parent" / "config.json"), read_json(runs[mode] / "parent" / "config.json")
    assert two["layer_order"] == one["layer_order"]  # re-ordering agreed with one process
    a = load_file(str(runs["single"] / "parent" / "model.safetensors"))
    b = load_file(str(runs[mode] / "parent" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)
    # the ledger (rank 0 only) records the world size and the work of all ranks
    single, multi = Ledger(runs["single"] / "ledger.jsonl"), Ledger(runs[mode] / "ledger.jsonl")
    progress = [r for r in multi.records() if r["event"] == "progress"]
    assert [p["steps"] for p in progress] == [[0, 4], [4, 8]] and all(p["world_size"] == 2 for p in progress)
    want = single.totals("train")
    got = multi.totals("train")
    assert (got["tokens"], got["flops"]) == (want["tokens"], want["flops"])
    assert got["tokens"] == STEPS * 4 * 32  # micro: global batch 4 x seq_len 32
    assert [r["event"] for r in multi.records() if r["phase"] == "train"] == ["start", "progress", "progress", "end"]
    evals = [r for r in multi.records() if r["phase"] == "train-eval"]  # validation passes, all ranks counted
    assert evals and all(r["world_size"] == 2 for r in evals)


@pytest.mark.slow
def test_the_cheap_row_step_trains_alike_at_one_and_two_ranks(tmp_path):
    """sampling.mode=rows lays out every block of batch / row_blocks rows alike and each rank takes
    whole blocks, so two FSDP2 ranks take the steps of one process (each rank runs every drawn
    configuration on its own rows; the ranks agree on the draws)."""
    rows = ["--set", "sampling.mode=rows", "--set", "sampling.row_blocks=2", "--set", "sampling.sub_rows=0.5"]
    res = _single(*ARGS, *rows, "--out", str(tmp_path / "one"))
    assert res.returncode == 0, res.stderr[-3000:]
    res = _torchrun(*ARGS, *rows, "--parallel", "fsdp", "--out", str(tmp_path / "two"))
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_close(_losses(tmp_path / "two"), _losses(tmp_path / "one"), RTOL)
    assert all(len(v) == 2 for v in _losses(tmp_path / "one").values())  # largest + one sub-network row
    one, two = Ledger(tmp_path / "one" / "ledger.jsonl"), Ledger(tmp_path / "two" / "ledger.jsonl")
    assert one.totals("train")["flops"] == two.totals("train")["flops"]
    bad = _torchrun(*ARGS, "--set", "sampling.mode=rows", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "sampling.row_blocks" in bad.stderr


@pytest.mark.slow
def test_sharded_checkpoint_is_manifested_and_resumes_exactly_at_two(runs, tmp_path):
    ckpt = runs["fsdp"] / "checkpoints" / "step-000004"
    assert distmod.is_sharded(ckpt) and not (ckpt / "model.safetensors").exists()
    verify_manifest(ckpt)
    assert "dcp/.metadata" in read_json(ckpt / "manifest.json")["files"]
    assert read_json(ckpt / "train_state.json")["world_size"] == 2
    run = _interrupted_copy(runs["fsdp"], tmp_path / "resumed")
    res = _torchrun(*ARGS, "--parallel", "fsdp", "--out", str(run), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _losses(run) == _losses(runs["fsdp"])  # exact: same world size, same reduction order
    a = load_file(str(runs["fsdp"] / "parent" / "model.safetensors"))
    b = load_file(str(run / "parent" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a corrupted shard index is caught like any other corrupted file
    meta = run / "checkpoints" / "step-000004" / "dcp" / ".metadata"
    raw = bytearray(meta.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    meta.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="metadata"):
        verify_manifest(meta.parent.parent)


@pytest.mark.slow
def test_world_size_two_outputs_load_in_one_process(runs, tmp_path):
    model, meta = load_model(runs["fsdp"] / "parent")  # the usual single-file model folder
    assert (
        meta["steps"] == STEPS
        and model.layer_order == read_json(runs["fsdp"] / "parent" / "config.json")["layer_order"]
    )
    assert not list((runs["fsdp"] / "parent").glob("*.distcp"))
    run = _interrupted_copy(runs["fsdp"], tmp_path / "at-one")
    res = _single(*ARGS, "--out", str(run), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "assuming the intent" not in res.stderr
    _assert_close(_losses(run), _losses(runs["fsdp"]), RTOL)


@pytest.mark.slow
def test_sampler_divergence_on_one_rank_stops_with_both_subnets_named(tmp_path):
    run = tmp_path / "diverged"
    res = _torchrun(*ARGS, "--out", str(run), env={distmod.TEST_DIVERGE_ENV: "1:2"}, timeout=120)
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "RankDivergenceError: ranks sampled different sub-networks at step 2" in text
    both = re.search(r"is (\w+)=(.+?) on rank 0 but \1=(.+?) on rank 1", text)
    assert both, text[-3000:]
    config = load_recipe("micro").model
    assert Subnet.parse(both[2], config) != Subnet.parse(both[3], config)  # both sides named, parseable
    assert not (run / "parent").exists()


@pytest.mark.slow
def test_nan_on_one_rank_makes_every_rank_skip_that_step(tmp_path):
    run = tmp_path / "nan"
    res = _torchrun(*ARGS, "--parallel", "fsdp", "--out", str(run), env={distmod.TEST_NAN_ENV: "1:2"})
    assert res.returncode == 0, res.stderr[-3000:]
    # injected at 0-based step 2, i.e. the third step, numbered 3 like every metrics record
    assert res.stderr.count("step 3 skipped: non-finite loss") == 2  # rank 0 and rank 1
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs if r.get("skipped")] == [3]
    assert len([r for r in recs if "loss" in r]) == STEPS - 1
    assert (run / "parent" / "manifest.json").exists()


@pytest.mark.slow
def test_a_hung_rank_fails_the_job_in_bounded_time_with_a_clear_message(tmp_path):
    """Rank 1 stops itself (SIGSTOP) at step 2; rank 0's next collective times out after the
    watchdog's limit and the job ends with one clear line instead of blocking forever."""
    run = tmp_path / "hung"
    env = {distmod.TEST_STOP_ENV: "1:2", distmod.COLLECTIVE_TIMEOUT_ENV: "5"}
    t0 = time.perf_counter()
    res = _torchrun(*ARGS, "--out", str(run), env=env, timeout=150)
    elapsed = time.perf_counter() - t0
    assert res.returncode != 0
    assert "a collective waited more than 5 s for another rank" in res.stderr, res.stderr[-3000:]
    assert elapsed < 120, elapsed
    assert not (run / "parent").exists()


SELECTION_BIAS_SCRIPT = """
import sys, torch, torch.distributed as dist
from elasticmoe.config import ModelConfig
from elasticmoe.dist import setup
from elasticmoe.model import ElasticMoE
from elasticmoe.reorder import reorder
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

par = setup(torch.device("cpu"), sys.argv[1])
c = ModelConfig(vocab_size=97, d_model=32, layers=3, heads=4, kv_heads=2, head_dim=8, experts=4, top_k=2,
                expert_width=24, max_seq_len=64, dense_layers=(0,), dense_width=20, router_bias=True)
torch.manual_seed(0)
model = ElasticMoE(c)
with torch.no_grad():  # a bias only rank 0 holds: the broadcast after re-ordering must carry it
    for n, b in model.named_buffers():
        if n.endswith("router_bias"):
            b.normal_(generator=torch.Generator().manual_seed(int(n.split(".")[1])))
model = par.wrap(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
model(tokens).logits.sum().backward()
opt.step()
summary = par.reorder(model, opt, lambda m, o: reorder(m, [tokens], o))
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
bias = torch.cat([full[f"blocks.{i}.moe.router_bias"].flatten() for i in (1, 2)])
gathered = [torch.zeros_like(bias) for _ in range(2)]
dist.all_gather(gathered, bias)
if par.is_main:
    print("PERMS", summary["expert_perms"], "AGREE", torch.equal(gathered[0], gathered[1]))
par.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_selection_bias_follows_its_expert_on_every_rank(tmp_path, mode):
    """ERNIE-4.5 / GLM-4.5's router selection bias is a buffer: re-ordering on rank 0 must carry it
    to every rank with the experts it belongs to (DDP broadcast parameters only, before)."""
    script = tmp_path / "bias.py"
    script.write_text(SELECTION_BIAS_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), mode]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "AGREE True" in res.stdout and "PERMS [[], [" in res.stdout, res.stdout[-2000:]


def test_global_batch_must_divide_by_world_size(tmp_path, monkeypatch):
    monkeypatch.setattr(distmod, "setup", lambda device, parallel: distmod.Parallel(device, 0, 3))
    with pytest.raises(ConfigError, match=r"train.batch_size=4 is the global batch.*world size 3"):
        trainmod.train(load_recipe("micro"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_parallel_choice_is_validated():
    with pytest.raises(ConfigError, match="parallel='zero'"):
        distmod.setup(torch.device("cpu"), "zero")
    assert distmod.setup(torch.device("cpu"), "fsdp").mode == "single"  # no torchrun: one process


def test_grad_buckets_respect_dtype_and_size():
    ps = [
        torch.nn.Parameter(torch.zeros(n, dtype=d))
        for n, d in [(4, torch.float32), (4, torch.float32), (2, torch.float64), (8, torch.float32)]
    ]
    buckets = distmod._buckets(ps, cap_bytes=32)
    assert [[p.numel() for p in b] for b in buckets] == [[4, 4], [2], [8]]


def test_manifest_covers_dot_files(tmp_path):
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(b"index")
    (tmp_path / "train_state.json").write_text("{}")
    write_manifest(tmp_path)
    assert set(read_json(tmp_path / "manifest.json")["files"]) == {"dcp/.metadata", "train_state.json"}
    (tmp_path / "dcp" / ".metadata").write_bytes(b"INDEX")
    with pytest.raises(CheckpointError, match="metadata"):
        verify_manifest(tmp_path)


def test_sharded_metadata_cannot_run_code(tmp_path):
    """DCP's `.metadata` is a pickle; ours is read by an allow-list unpickler, so a crafted file that
    would call os.system on load is refused before anything runs."""
    import io
    import pickle

    from elasticmoe.checkpoint import CheckpointError
    from elasticmoe.dist import _MetadataUnpickler

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps({"storage_data": Evil()})
    with pytest.raises(CheckpointError, match="not allowed"):
        _MetadataUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()
