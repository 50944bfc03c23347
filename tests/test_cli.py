"""The command line over a trained micro run: every command runs (info, train, search, extract,
export, import-hf, finetune, baseline, eval, lm-eval-tasks, report; `run`: test_phases.py and
test_pipeline_stages.py), and bad input is one-line errors (exit 2)."""

from __future__ import annotations

import json
import shutil

import pytest

from elasticmoe.checkpoint import verify_manifest


@pytest.fixture(scope="module")
def run(micro_run):
    return micro_run


def test_search_extract_export_eval_report(run, tmp_path, cli, one_line_error):
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
    gguf = cli("export", child, "--format", "gguf", "--gguf-type", "f16", "--out", tmp_path / "gguf").stdout
    assert "(gguf f16" in gguf and "random" not in gguf and "greedy identical" in gguf
    assert (tmp_path / "gguf" / "model-f16.gguf").is_file()

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


def test_bad_inputs_are_one_line_errors(run, tmp_path, cli, one_line_error):
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
    one_line_error(cli("run", "--config", "micro", "--children", "nope", "--out", tmp_path / "r", ok=False), "nope")
    assert not (tmp_path / "r").exists()
    one_line_error(cli("finetune", run / "parent", "--tokens", "100", "--out", tmp_path / "f", ok=False), "data")
    # a model folder given where a run belongs is refused without leaving a lock file in it
    one_line_error(cli("report", run / "parent", ok=False), "not a run folder")
    one_line_error(cli("search", run / "parent", "--max-params-ratio", "1/2", ok=False), "not a run folder")
    assert not (run / "parent" / ".elasticmoe.lock").exists()
    verify_manifest(run / "parent")


def test_info_lists_every_uniform_subnet_with_its_cost(cli_main, capsys):
    from elasticmoe.cost import cost
    from elasticmoe.recipe import load_recipe
    from elasticmoe.subnet import Subnet, enumerate_uniform

    capsys.readouterr()
    assert cli_main("info", "--config", "micro", "--set", "space.widths=[64]", "--forward") == 0
    out = capsys.readouterr().out
    r = load_recipe("micro", ["space.widths=[64]"])
    subnets = enumerate_uniform(r.space, list(range(r.model.layers)))
    rows = [ln for ln in out.splitlines() if " k" in ln and " W64" in ln]
    assert f"{len(subnets)} uniform sub-networks (seq_len {r.data.seq_len})" in out and len(rows) == len(subnets)
    full = cost(r.model, Subnet.full(r.model), r.data.seq_len)
    parent_row = next(ln for ln in rows if str(Subnet.full(r.model)) in ln)
    assert f"{full.total_params:,}" in parent_row and parent_row.count("1.000") == 2


def test_finetune_and_baseline_commands(run, tmp_path, cli):
    from elasticmoe.checkpoint import load_model
    from elasticmoe.ledger import Ledger
    from elasticmoe.recipe import load_recipe

    r = load_recipe(run / "recipe.yaml")
    step_tokens = r.train.batch_size * r.data.seq_len
    led = Ledger(run / "ledger.jsonl")
    child = tmp_path / "child"
    cli("extract", run, "--subnet", "L2 E2 k1 W32", "--out", child)
    out = cli("finetune", child, "--teacher", run, "--steps", 3, "--out", tmp_path / "ft").stdout
    assert f"fine-tuned 3 steps / {3 * step_tokens:,} tokens" in out and "KL to teacher" in out
    model, meta = load_model(tmp_path / "ft" / "model")
    assert meta["kind"] == "finetuned-child" and meta["finetune"]["steps"] == 3 and model.config.layers == 2
    assert led.totals("finetune", out=str((tmp_path / "ft").resolve()))["tokens"] == 3 * step_tokens

    out = cli("baseline", run, "--arch", "L2 E2 k1 W32", "--steps", 2, "--name", "twin", "--quiet").stdout
    assert f"baseline (scratch) -> {run / 'baselines' / 'twin' / 'parent'}" in out
    twin, meta = load_model(run / "baselines" / "twin" / "parent")
    assert twin.config == model.config and meta["steps"] == 2
    assert led.totals("baseline", run="baselines/twin")["tokens"] == 2 * step_tokens
    cli("baseline", run, "--method", "dense-parent", "--steps", 2, "--quiet")
    out = cli("baseline", run, "--method", "prune-distill", "--arch", "L2 E2 k1 W32", "--steps", 2).stdout
    folder = run / "baselines" / "prune-distill-L0-1_E2_k1_W32"
    assert f"-> {folder / 'distilled' / 'model'}" in out
    assert load_model(folder / "distilled" / "model")[0].config == model.config
    assert led.totals("finetune", out=led.ref(folder / "distilled"))["tokens"] == 2 * step_tokens
