"""Search: constraints, evaluator cache, latency table, ridge predictor, Pareto fronts, outputs."""

import itertools
import json
import random

import numpy as np
import pytest
import torch

from elasticmoe import cost as costmod
from elasticmoe.config import ConfigError, ElasticSpace
from elasticmoe.model import ElasticMoE
from elasticmoe.search import (
    Constraints,
    LatencyTable,
    RidgePredictor,
    SubnetEvaluator,
    dominates,
    evolutionary_search,
    exhaustive_search,
    pareto_front,
    parse_constraints,
    search,
)
from elasticmoe.search_output import format_table, write_search_results
from elasticmoe.subnet import Subnet, enumerate_uniform, sample_uniform

SEQ = 32  # constraints' sequence length (FLOPs, memory, latency)


@pytest.fixture
def parent(tiny_config):
    torch.manual_seed(0)
    return ElasticMoE(tiny_config)


@pytest.fixture
def windows():
    g = torch.Generator().manual_seed(1)
    return {"prose": torch.randint(0, 97, (4, 17), generator=g), "kv": torch.randint(0, 97, (4, 17), generator=g)}


@pytest.fixture
def space():
    return ElasticSpace(depths=(1, 2, 3), experts=(1, 2, 4), top_ks=(1, 2), widths=(8, 16, 24))


def evaluator(parent, windows):
    return SubnetEvaluator(parent, windows, "cpu", task_weights={"prose": 2.0, "kv": 1.0})


def evo(parent, windows, space, constraints=None, seed=0, **kw):
    kw = {"population": 6, "generations": 3, **kw}
    return evolutionary_search(evaluator(parent, windows), space, parent.layer_order, constraints, seed, **kw)


# -- constraints -------------------------------------------------------------------------------
def test_parse_constraints_forms():
    c = parse_constraints(["max_params_ratio=1/3", "max_active_params=2.5k", "max_memory_mb=50%", "batch=8"])
    assert c.max_params_ratio == pytest.approx(1 / 3)
    assert c.max_active_params == 2500 and c.max_memory_mb == 0.5 and c.batch == 8
    assert parse_constraints({"max_flops_per_token": "1e6", "seq_len": 32}) == Constraints(
        max_flops_per_token=1e6, seq_len=32
    )
    assert parse_constraints(None) == Constraints()


def test_parse_constraints_reports_every_problem():
    with pytest.raises(ConfigError) as exc:
        parse_constraints({"max_parms": 3, "max_active_ratio": "half", "max_params": -1, "batch": 1.5})
    msg = str(exc.value)
    assert "max_parms" in msg and "allowed" in msg and "max_active_params" in msg
    assert "max_active_ratio='half'" in msg and "max_params=-1" in msg and "batch=1.5" in msg
    with pytest.raises(ConfigError, match="key=value"):
        parse_constraints(["max_params"])
    with pytest.raises(ConfigError, match="positive"):
        Constraints(max_latency_ms=0)


def _limits(parent, cons: Constraints):
    """Absolute limits recomputed here from the cost module, independently of search.py."""
    c = parent.config
    full = costmod.cost(c, None, SEQ)
    mem = costmod.memory_bytes(c, None, SEQ, cons.batch) / 2**20
    pairs = {
        "params": (cons.max_params, cons.max_params_ratio, full.total_params),
        "active": (cons.max_active_params, cons.max_active_ratio, full.active_params),
        "flops": (cons.max_flops_per_token, cons.max_flops_ratio, full.flops_forward),
        "memory": (cons.max_memory_mb, cons.max_memory_ratio, mem),
    }
    return {
        k: min([x for x in (a, r * base if r else None) if x is not None], default=float("inf"))
        for k, (a, r, base) in pairs.items()
    }


def _assert_within(parent, subnet, limits, batch):
    c = parent.config
    got = costmod.cost(c, subnet, SEQ)
    assert got.total_params <= limits["params"]
    assert got.active_params <= limits["active"]
    assert got.flops_forward <= limits["flops"]
    assert costmod.memory_bytes(c, subnet, SEQ, batch) / 2**20 <= limits["memory"]


@pytest.mark.parametrize(
    "given",
    [
        {"max_params_ratio": 1 / 3 * 2, "max_active_ratio": 1 / 2},
        {"max_params": 20_000, "max_flops_per_token": 40_000},
        {"max_memory_mb": 0.08, "max_flops_ratio": 0.7, "batch": 4},
        {"max_memory_ratio": 0.6, "max_active_params": 16_000},
    ],
)
def test_every_point_meets_every_constraint(parent, windows, space, given):
    cons = parse_constraints({**given, "seq_len": SEQ})
    limits = _limits(parent, cons)
    for result in (
        evo(parent, windows, space, cons, seed=2, per_layer=True),
        exhaustive_search(evaluator(parent, windows), space, parent.layer_order, cons),
    ):
        assert result.frontier
        for cand in result.evaluated + result.frontier:
            _assert_within(parent, cand.subnet, limits, cons.batch)
            assert cand.subnet.in_space(space)


def test_latency_constraint_is_met_by_prediction(parent, windows, space):
    table = LatencyTable.measure(parent, SEQ, 2, "cpu", repeats=3, space=space)
    median = sorted(table.predict(s) for s in enumerate_uniform(space, parent.layer_order))[20]
    cons = {"max_latency_ms": median, "batch": 2, "seq_len": SEQ}
    result = evo(parent, windows, space, cons, latency_table=table, measure_latency=False)
    assert result.latency_frontier
    assert all(c.latency_ms <= median for c in result.evaluated)
    with pytest.raises(ConfigError, match="latency table"):
        evo(parent, windows, space, cons)  # a latency limit without a table
    with pytest.raises(ConfigError, match="re-measure"):
        evo(parent, windows, space, {**cons, "batch": 1}, latency_table=table)


def test_impossible_constraints_name_smallest_achievable(parent, windows, space):
    smallest = Subnet.uniform([0], 1, 1, 8)
    low = costmod.cost(parent.config, smallest, SEQ)
    for fn in (evo, lambda *a, **k: search(evaluator(parent, windows), space, parent.layer_order, a[3])):
        with pytest.raises(ConfigError) as exc:
            fn(parent, windows, space, {"max_params": 1000, "seq_len": SEQ})
        msg = str(exc.value)
        assert f"params {low.total_params:,}" in msg and f"active params {low.active_params:,}" in msg
        assert f"FLOPs/token {low.flops_forward:,}" in msg and "memory" in msg and "MiB" in msg
    table = LatencyTable.measure(parent, SEQ, 1, "cpu", repeats=1, space=space)
    with pytest.raises(ConfigError, match=r"latency [0-9.]+ ms"):
        exhaustive_search(
            evaluator(parent, windows),
            space,
            parent.layer_order,
            {"max_latency_ms": 1e-6, "seq_len": SEQ},
            latency_table=table,
        )


# -- reproducibility and fronts ----------------------------------------------------------------
def _summary(result):
    return [(c.text, c.loss, c.losses) for c in result.frontier], [c.text for c in result.evaluated]


@pytest.mark.parametrize("per_layer,use_predictor", [(False, False), (True, True)])
def test_same_seed_same_result(parent, windows, space, per_layer, use_predictor):
    cons = {"max_active_ratio": 0.8, "seq_len": SEQ}
    kw = {"per_layer": per_layer, "use_predictor": use_predictor, "generations": 3}
    a = evo(parent, windows, space, cons, seed=7, **kw)
    b = evo(parent, windows, space, cons, seed=7, **kw)
    assert _summary(a) == _summary(b)
    if use_predictor:
        assert a.predictor["n_out_of_sample"] > 0 and a.predictor == b.predictor
    evo(parent, windows, space, cons, seed=8, **kw)  # another seed runs (and may differ)


def test_fronts_are_nondominated_and_complete(parent, windows, space):
    table = LatencyTable.measure(parent, SEQ, 1, "cpu", repeats=1, space=space)
    for result in (
        evo(parent, windows, space, {"seq_len": SEQ}, latency_table=table, per_layer=True),
        exhaustive_search(evaluator(parent, windows), space, parent.layer_order, {"seq_len": SEQ}, latency_table=table),
    ):
        for front, attr in ((result.frontier, "active_params"), (result.latency_frontier, "latency_ms")):
            key = lambda c, attr=attr: (c.loss, getattr(c, attr))  # noqa: E731
            assert front
            for a, b in itertools.permutations(front, 2):
                assert not dominates(key(a), key(b))
            on_front = {c.subnet for c in front}
            for cand in result.evaluated:  # brute force over everything evaluated
                assert not any(dominates(key(cand), key(f)) for f in front)
                if cand.subnet not in on_front:
                    assert any(dominates(key(f), key(cand)) or key(f) == key(cand) for f in front)
        assert all(c.latency_ms_measured is not None for c in result.reported)


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    pts = [(rng.randint(0, 20), rng.randint(0, 20)) for _ in range(200)]
    front = pareto_front(pts, [lambda p: p[0], lambda p: p[1]])
    brute = [p for p in pts if not any(dominates(q, p) for q in pts)]
    assert sorted(front) == sorted(brute) and front == sorted(front)


def test_evolution_settings_are_validated(parent, windows, space):
    with pytest.raises(ConfigError) as exc:
        evo(parent, windows, space, population=1, mutation_prob=1.5)
    assert "population=1" in str(exc.value) and "mutation_prob=1.5" in str(exc.value)


def test_search_picks_exhaustive_for_small_spaces(parent, windows, space):
    ev = evaluator(parent, windows)
    result = search(ev, space, parent.layer_order, {"seq_len": SEQ})
    assert result.method == "exhaustive"
    assert len(result.evaluated) == len(enumerate_uniform(space, parent.layer_order))
    assert result.tokens == ev.tokens and result.flops == ev.flops > 0
    result = search(ev, space, parent.layer_order, {"seq_len": SEQ}, exhaustive_limit=10, population=4, generations=1)
    assert result.method == "evolutionary"


# -- evaluator, latency, predictor -------------------------------------------------------------
def test_evaluator_caches_and_counts(parent, windows):
    calls = []
    parent.register_forward_hook(lambda *a: calls.append(1))
    ev = evaluator(parent, windows)
    sn = Subnet.uniform([0, 2], 2, 1, 16)
    first = ev(sn)
    n = len(calls)
    assert n == 2 and ev(sn) == first and len(calls) == n and ev.evaluations == 1  # 2 tasks, 1 batch each
    tokens = sum(w[:, 1:].numel() for w in windows.values())
    assert ev.tokens == tokens
    assert ev.flops == costmod.cost(parent.config, sn, 16).flops_forward * tokens
    assert ev.mix(first) == pytest.approx((2 * first["prose"] + first["kv"]) / 3)
    ev(Subnet.uniform([0], 1, 1, 8))
    assert ev.evaluations == 2 and ev.tokens == 2 * tokens
    with pytest.raises(ConfigError, match="task_weights"):
        SubnetEvaluator(parent, windows, "cpu", task_weights={"math": 1.0})


def test_latency_table_predicts_direct_measurement(parent, space, tmp_path):
    # Min over interleaved rounds: a shared 2-core machine adds load spikes that a median of a few
    # sub-millisecond runs does not always absorb; the factor is loose for the same reason.
    table = LatencyTable.measure(parent, SEQ, 4, "cpu", repeats=7, space=space, statistic="min")
    rng = random.Random(0)
    held_out = list({sample_uniform(space, parent.layer_order, rng) for _ in range(8)})
    report = table.validate(held_out)
    assert report["n"] == len(held_out)
    for p in report["points"]:
        assert 1 / 3 < p["predicted_ms"] / p["measured_ms"] < 3, p
    table.save(tmp_path / "latency.json")
    loaded = LatencyTable.load(tmp_path / "latency.json")
    assert all(loaded.predict(s) == pytest.approx(table.predict(s)) for s in held_out)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="latency table"):
        LatencyTable.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="no MoE entry"):
        table.predict(Subnet.uniform([0], 3, 1, 8))


def test_latency_table_times_a_dense_layer_once(tiny_config, space, tmp_path):
    """A dense layer (ERNIE-4.5, GLM-4.5) is kept whole: its time is one figure whatever its spec,
    and it survives saving."""
    from dataclasses import replace

    from elasticmoe.subnet import LayerSpec

    config = replace(tiny_config, dense_layers=(0,), dense_width=40)
    torch.manual_seed(0)
    parent = ElasticMoE(config).eval()
    table = LatencyTable.measure(parent, SEQ, 1, "cpu", repeats=1, space=space)
    assert table.dense_layers == (0,) and table.dense_ms > 0
    a, b = Subnet.uniform([0, 1], 2, 1, 8), Subnet((0, 1), (LayerSpec(4, 2, 24), LayerSpec(2, 1, 8)))
    assert (
        table.predict(a)
        == table.predict(b)
        == pytest.approx(table.base_ms + 2 * table.attention_ms + table.dense_ms + table.moe_ms[(2, 1, 8)])
    )
    table.save(tmp_path / "latency.json")
    assert LatencyTable.load(tmp_path / "latency.json").predict(a) == pytest.approx(table.predict(a))


def test_ridge_fits_a_linear_relation():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5)) * [1, 10, 100, 0.1, 3]
    w = np.array([0.5, -0.02, 0.003, 4.0, 0.0])
    y = X @ w + 2.5
    model = RidgePredictor(alpha=1e-8).fit(X, y)
    X_new = rng.normal(size=(20, 5)) * [1, 10, 100, 0.1, 3]
    np.testing.assert_allclose(model.predict(X_new), X_new @ w + 2.5, atol=1e-5)
    X_const = np.c_[X, np.ones(60)]  # a constant feature must not break the fit
    np.testing.assert_allclose(RidgePredictor().fit(X_const, y).predict(X_const), y, atol=1e-2)


# -- outputs -----------------------------------------------------------------------------------
def test_write_results_and_table(parent, windows, space, tmp_path):
    table = LatencyTable.measure(parent, SEQ, 1, "cpu", repeats=1, space=space)
    cons = parse_constraints(["max_params_ratio=2/3", f"seq_len={SEQ}"])
    result = evo(parent, windows, space, cons, seed=3, latency_table=table, use_predictor=True)
    paths = write_search_results(tmp_path / "search", result, 3, cons, costmod.cost(parent.config, None, SEQ))
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    data = json.loads(paths["json"].read_text())
    assert data["seed"] == 3 and data["method"] == "evolutionary"
    assert data["constraints"]["given"] == {"max_params_ratio": pytest.approx(2 / 3), "seq_len": SEQ}
    full = costmod.cost(parent.config, None, SEQ)
    assert data["constraints"]["resolved"]["params"] == pytest.approx(2 / 3 * full.total_params)
    assert data["parent"]["params"] == full.total_params == data["parent_cost"]["total_params"]
    assert set(data["predictor_error"]) == {"loss", "latency"}
    assert data["predictor_error"]["latency"]["n"] > 0
    assert data["search_cost"]["tokens"] > 0 and len(data["evaluated"]) == len(result.evaluated)
    fields = {
        "subnet",
        "subnet_json",
        "params",
        "active_params",
        "flops_per_token",
        "memory_bytes",
        "memory_mb",
        "latency_ms_predicted",
        "latency_ms_measured",
        "loss_per_task",
        "loss_mix",
    }
    for point in data["frontier"] + data["latency_frontier"]:
        assert fields <= set(point)
        sn = Subnet.from_dict(point["subnet_json"])
        assert str(sn) == point["subnet"] and set(point["loss_per_task"]) == {"prose", "kv"}
    rich_table = format_table(result)
    assert rich_table.row_count == len(result.reported) + 1


# -- objective: a weighted task score ------------------------------------------------------------
def test_parse_objective():
    from elasticmoe.search import parse_objective

    assert parse_objective("find=1,text=0.2") == {"find": 1.0, "text": 0.2}
    assert parse_objective({"kv": "1/2"}) == {"kv": 0.5}
    assert parse_objective(None) is None and parse_objective("") is None
    with pytest.raises(ConfigError, match=r"find='-1', text='x'"):
        parse_objective("find=-1,text=x")
    with pytest.raises(ConfigError, match="all weights 0"):
        parse_objective("find=0")
    with pytest.raises(ConfigError, match=r"find=''"):
        parse_objective("find")


def test_objective_ranks_by_its_tasks_and_shares_the_cache(parent, windows, space, tmp_path):
    """A search with --objective kv=1 scores every candidate by its kv loss alone and picks the one
    with the lowest; the general search (prose 2 : kv 1) picks by the mix. The second search costs
    no new evaluation, and pareto.json names the weights."""
    from elasticmoe.search import parse_objective

    ev = evaluator(parent, windows)
    cons = {"seq_len": SEQ, "max_active_ratio": 0.6}
    general = search(ev, space, parent.layer_order, cons)
    done = ev.evaluations
    targeted_ev = ev.weighted(parse_objective("kv=1"))
    targeted = search(targeted_ev, space, parent.layer_order, cons)
    assert ev.evaluations == done and targeted_ev.evaluations == 0 and targeted.flops == 0  # all cached
    assert all(c.loss == c.losses["kv"] for c in targeted.evaluated)
    assert all(c.loss == pytest.approx((2 * c.losses["prose"] + c.losses["kv"]) / 3) for c in general.evaluated)
    best_kv = min(targeted.evaluated, key=lambda c: c.losses["kv"])
    assert min(targeted.frontier, key=lambda c: c.loss).subnet == best_kv.subnet
    assert targeted.objective == {"prose": 0.0, "kv": 1.0} and general.objective == {"prose": 2 / 3, "kv": 1 / 3}
    paths = write_search_results(tmp_path, targeted)
    assert json.loads(paths["json"].read_text())["objective"] == {"prose": 0.0, "kv": 1.0}
    with pytest.raises(ConfigError, match="unknown"):
        ev.weighted({"find": 1.0})


def test_cli_takes_an_objective():
    from elasticmoe.cli import build_parser

    args = build_parser().parse_args(
        ["search", "runs/x", "--max-params-ratio", "1/3", "--objective", "find=1,text=0.2"]
    )
    assert args.objective == "find=1,text=0.2"
