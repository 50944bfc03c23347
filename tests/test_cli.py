"""The command line over a trained micro run: search -> extract -> export -> import -> eval -> report,
and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from elasticmoe.recipe import load_recipe
from elasticmoe.train import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args, ok=True):
    res = subprocess.run(
        [sys.executable, "-m", "elasticmoe", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300
    )
    if ok:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def one_line_error(res, needle: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and needle in errors[0], res.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "run"
    train(load_recipe("micro", ["train.steps=30", "train.eval_every=30", "train.ckpt_every=30"]), path, progress=False)
    return path


def test_search_extract_export_eval_report(run, tmp_path):
    cli("search", run, "--max-params-ratio", "1/3", "--max-active-ratio", "1/2")
    pareto = json.loads((run / "search" / "pareto.json").read_text())
    parent = pareto["parent"]
    assert pareto["frontier"]
    for point in pareto["frontier"]:
        assert point["params"] <= parent["params"] / 3 and point["active_params"] <= parent["active_params"] / 2
    assert (run / "search" / "pareto.png").exists()

    child = run / "children" / "c0"
    out = cli("extract", run, "--from-search", 0, "--out", child).stdout
    assert "max |logit diff|" in out
    meta = json.loads((child / "config.json").read_text())["meta"]
    assert meta["subnet"] == pareto["frontier"][0]["subnet"] and meta["verification"]["max_abs_logit_diff"] <= 1e-4

    hf = tmp_path / "hf"
    assert "transformers vs elasticmoe" in cli("export", child, "--out", hf).stdout
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]

    imported = tmp_path / "imported"
    cli("import-hf", hf, "--out", imported)
    assert (imported / "parent" / "manifest.json").exists() and (imported / "recipe.yaml").exists()
    cont = tmp_path / "continued"
    cli(
        "train",
        "--config",
        imported / "recipe.yaml",
        "--set",
        "train.steps=2",
        "--set",
        "data.scale=0.05",
        "--set",
        "train.batch_size=2",
        "--set",
        "data.seq_len=32",
        "--out",
        cont,
        "--quiet",
    )
    assert (cont / "parent" / "manifest.json").exists()

    res_path = tmp_path / "eval.json"
    cli("eval", run / "parent", child, "--examples", 5, "--out", res_path)
    res = json.loads(res_path.read_text())
    assert set(res["models"]) == {"parent", "c0"} and res["retention"]

    no_base = cli("report", run).stdout
    assert "no baseline for this architecture, so no percentage" in no_base
    one_line_error(cli("report", run, "--percent", ok=False), "elasticmoe baseline")
    est = cli("report", run, "--estimate-baseline-tokens", 100000, "--claim", "6% of pre-training cost").stdout
    assert "F_train x D = " in est and "Claim check" in est

    tasks = tmp_path / "lm_eval"
    cli("lm-eval-tasks", run, "--out", tasks, "--examples", 5)
    assert (tasks / "elasticmoe.yaml").exists() and (tasks / "elasticmoe_kv.jsonl").exists()


def test_bad_inputs_are_one_line_errors(run, tmp_path):
    one_line_error(cli("extract", run, "--subnet", "L2 E9 k1 W16", "--out", tmp_path / "x", ok=False), "experts=9")
    one_line_error(cli("extract", run, "--subnet", "banana", "--out", tmp_path / "x", ok=False), "banana")
    one_line_error(
        cli("extract", tmp_path / "nope", "--subnet", "L2 E2 k1 W32", "--out", tmp_path / "x", ok=False), "nope"
    )
    assert not (tmp_path / "x").exists()
    one_line_error(cli("search", run, "--max-params", "10", ok=False), "smallest achievable")
    one_line_error(cli("search", run, "--max-params-ratio", "abc", ok=False), "max_params_ratio")
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    target = broken / "parent" / "model.safetensors"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    one_line_error(
        cli("extract", broken, "--subnet", "L2 E2 k1 W32", "--out", tmp_path / "y", ok=False), "model.safetensors"
    )
    one_line_error(cli("export", tmp_path / "nope", "--out", tmp_path / "z", ok=False), "not a model folder")
    one_line_error(cli("finetune", run / "parent", "--tokens", "100", "--out", tmp_path / "f", ok=False), "data")
