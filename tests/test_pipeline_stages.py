"""`elasticmoe X` and the pipeline's phase X run the same stage function: given the same arguments
they produce the same results (same frontier, same weights, same verification, same scores)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from elasticmoe.ledger import Ledger
from elasticmoe.pipeline import FINETUNE_LR_SCALE, Pipeline
from elasticmoe.recipe import load_recipe

FAMILY = {"ernie": {"max_params_ratio": 1 / 3, "max_active_ratio": 1 / 2}}


@pytest.fixture(scope="module")
def pipe(micro_run):
    return Pipeline(
        load_recipe(micro_run / "recipe.yaml"),
        micro_run,
        family=FAMILY,
        finetune_fraction=0.1,
        eval_examples=3,
        progress=False,
    )


def _through(pipe: Pipeline, phase: str) -> dict:
    """Run the pipeline's phases up to and including `phase` (each once); its outputs."""
    for name in ("search", "extract", "export", "finetune", "eval"):
        if not pipe._done(name):
            pipe._finish(name, getattr(pipe, f"phase_{name}")())
        if name == phase:
            return pipe.state["phases"][name]["outputs"]
    raise AssertionError(phase)


def _same_tensors(a, b) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


def test_search(pipe, cli, tmp_path):
    child = _through(pipe, "search")["children"]["ernie"]
    r = pipe.recipe
    out = tmp_path / "search"
    flags = ["--max-params-ratio", "1/3", "--max-active-ratio", "1/2", "--latency", "--out", out]
    cli("search", pipe.run, *flags, "--windows", r.train.eval_windows, "--seed", r.train.seed)
    ours = json.loads((pipe.run / "search" / "ernie" / "pareto.json").read_text())
    theirs = json.loads((out / "pareto.json").read_text())
    assert [(p["subnet"], p["loss_mix"]) for p in ours["frontier"]] == [
        (p["subnet"], p["loss_mix"]) for p in theirs["frontier"]
    ]
    assert ours["constraints"]["resolved"] == theirs["constraints"]["resolved"]
    assert child["subnet"] in {p["subnet"] for p in theirs["frontier"]}
    assert (pipe.run / "search" / "latency_table.json").is_file() and (out / "latency_table.json").is_file()
    searches = [
        r for r in Ledger(pipe.run / "ledger.jsonl").records() if r["phase"] == "search" and r["event"] == "end"
    ]
    assert {r["model"] for r in searches} == {"latency-table", "ernie", "cli"}
    assert all(r["tokens"] > 0 for r in searches if r["model"] != "latency-table")


def test_extract_and_export(pipe, cli, tmp_path):
    exported = _through(pipe, "export")
    child = pipe.state["phases"]["search"]["outputs"]["children"]["ernie"]
    cli("extract", pipe.run, "--subnet", child["subnet"], "--out", tmp_path / "child")
    _same_tensors(pipe.run / "children" / "ernie" / "model.safetensors", tmp_path / "child" / "model.safetensors")
    cli("export", tmp_path / "child", "--out", tmp_path / "hf")
    _same_tensors(pipe.run / "hf" / "ernie" / "model.safetensors", tmp_path / "hf" / "model.safetensors")
    ours = json.loads((pipe.run / "hf" / "ernie" / "config.json").read_text())
    theirs = json.loads((tmp_path / "hf" / "config.json").read_text())
    # checked on the same held-out tokens of the run: the same logit difference, to the last bit
    key = "hf_verification"
    assert ours["elasticmoe_provenance"][key] == theirs["elasticmoe_provenance"][key], (
        ours["elasticmoe_provenance"][key],
        theirs["elasticmoe_provenance"][key],
    )
    assert exported["ernie"]["max_abs_logit_diff"] == theirs["elasticmoe_provenance"][key]["max_abs_logit_diff"]
    assert exported["_proof"]["new_tokens"] > 0
    # the exported config names models, not folders of the machine that wrote it
    for text in (
        (pipe.run / "hf" / "ernie" / "config.json").read_text(),
        (tmp_path / "hf" / "config.json").read_text(),
    ):
        assert str(tmp_path) not in text and str(pipe.run.resolve()) not in text and '"/' not in text


def test_finetune(pipe, cli, tmp_path):
    done = _through(pipe, "finetune")["ernie"]
    lr = pipe.recipe.train.lr * FINETUNE_LR_SCALE
    child = pipe.run / "children" / "ernie"
    out = tmp_path / "ft"
    cli("finetune", child, "--teacher", pipe.run, "--tokens", done["tokens"], "--lr", repr(lr), "--out", out)
    _same_tensors(pipe.run / "finetuned" / "ernie" / "model" / "model.safetensors", out / "model" / "model.safetensors")
    meta = json.loads((out / "model" / "config.json").read_text())["meta"]["finetune"]
    assert meta["val_after"] == done["val_after"] and meta["kd_after"] == done["kd_after"]
    # a finished fine-tune is read back, not run again
    again = pipe.phase_finetune()["ernie"]
    assert again == done


def test_eval(pipe, cli, tmp_path):
    results = _through(pipe, "eval")["results"]["models"]
    run = pipe.run
    out = tmp_path / "eval.json"
    cli("eval", run / "parent", run / "children" / "ernie", run / "finetuned" / "ernie", "--examples", 3, "--out", out)
    theirs = json.loads(out.read_text())["models"]
    assert set(theirs) == set(results) == {"parent", "ernie", "ernie-ft"}
    for name in results:
        assert {t: v["score"] for t, v in theirs[name]["tasks"].items()} == {
            t: v["score"] for t, v in results[name]["tasks"].items()
        }


def test_eta_counts_the_alternatives_that_will_run(tmp_path, capsys):
    """After training, the ETA weighs the baseline phase by what --baselines will train."""
    import time

    etas = {}
    for which in ("reference", "all"):
        p = Pipeline(load_recipe("micro"), tmp_path / which, baselines=which)
        p._ran, p.t0 = {"train"}, time.perf_counter() - 60.0  # training took a minute
        p._header(1, "search", skipped=False)
        etas[which] = float(capsys.readouterr().out.split("eta ~")[1].split(" min")[0])
    assert etas["all"] > 2 * etas["reference"] > 0


def test_targeted_child_is_ranked_by_its_objective_and_finetuned_on_its_mix(micro_run):
    """`run`'s search-targeted child: the constraints of its general twin, the candidate with the
    lowest objective-weighted loss, a fine-tune on the objective's task mix (and no targeted child
    when the family lacks its twin)."""
    objective = {"find": 1.0, "text": 0.2}
    targeted = {"ernie-find": {"like": "ernie", "objective": objective}}
    recipe = load_recipe(micro_run / "recipe.yaml")
    assert Pipeline(recipe, micro_run, family={"other": FAMILY["ernie"]}, progress=False).targeted == {}
    pipe = Pipeline(recipe, micro_run, family=FAMILY, targeted=targeted, eval_examples=3, progress=False)
    chosen = pipe.phase_search()["children"]
    child = chosen["ernie-find"]
    assert child["like"] == "ernie" and child["objective"] == objective
    pareto = json.loads((micro_run / "search" / "ernie-find" / "pareto.json").read_text())
    general = json.loads((micro_run / "search" / "ernie" / "pareto.json").read_text())
    assert pareto["constraints"]["resolved"] == general["constraints"]["resolved"]
    weights = pareto["objective"]
    assert weights["find"] == pytest.approx(1 / 1.2) and weights["text"] == pytest.approx(0.2 / 1.2)
    assert sum(weights.values()) == pytest.approx(1.0)
    points = [p for p in pareto["frontier"] if p["subnet"] != pareto["parent"]["subnet"]]
    for p in points:
        assert p["loss_mix"] == pytest.approx(sum(w * p["loss_per_task"][t] for t, w in weights.items()))
    assert child["subnet"] == min(points, key=lambda p: p["loss_mix"])["subnet"]
    pipe.state = {"phases": {"search": {"outputs": {"children": {"ernie-find": child}}}}}  # in memory only
    pipe.phase_extract()
    pipe.phase_finetune()
    meta = json.loads((micro_run / "finetuned" / "ernie-find" / "model" / "config.json").read_text())["meta"]
    assert meta["finetune"]["task_weights"] == objective


def test_children_choose_the_family_and_a_rerun_keeps_it(tmp_path):
    """`run --children`: a subset of the default family by name (the first the reference, a
    targeted child only beside its twin); a rerun that names other children is refused."""
    from elasticmoe.config import ConfigError
    from elasticmoe.pipeline import DEFAULT_FAMILY, family_of, run_pipeline

    family, targeted = family_of(["ernie51-shape"])
    assert family == {"ernie51-shape": DEFAULT_FAMILY["ernie51-shape"]} and targeted == {}
    family, targeted = family_of(["ernie51-shape", "ernie51-find"])
    assert list(family) == ["ernie51-shape"] and list(targeted) == ["ernie51-find"]
    for bad, words in (
        (["nope"], "name each child once"),
        (["ernie51-shape", "ernie51-shape"], "name each child once"),
        ([], "name each child once"),
        (["active-third", "ernie51-find"], "name ernie51-shape too"),
        (["ernie51-find", "ernie51-shape"], "the first child is the reference"),
    ):
        with pytest.raises(ConfigError, match=words):
            family_of(bad)
    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline.json").write_text(json.dumps({"phases": {}, "family": ["ernie51-shape"]}))
    with pytest.raises(ConfigError, match="started with the children ernie51-shape, not active-third"):
        run_pipeline(load_recipe("micro"), run, progress=False, family={"active-third": DEFAULT_FAMILY["active-third"]})
