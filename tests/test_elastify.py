"""`elasticmoe elastify`: a transformers MoE made elastic with the imported original, frozen, as the
teacher; its children export back to the source's class; refusals leave nothing behind (issue #25).

Models are made here with transformers' own config classes and random weights (no download)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from elasticmoe import train as trainmod  # noqa: E402
from elasticmoe.checkpoint import load_model  # noqa: E402
from elasticmoe.elastify import elastify, plan  # noqa: E402
from elasticmoe.hf_import import import_hf  # noqa: E402
from elasticmoe.ledger import Ledger  # noqa: E402
from elasticmoe.recipe import load_recipe  # noqa: E402
from elasticmoe.subnet import Subnet  # noqa: E402

TOL = 1e-4
STEP_TOKENS = 4 * 32  # the micro preset's batch x seq_len


def hf_moe(kind: str, seed: int = 0, width: int = 24):
    """A random transformers MoE of `kind` with the micro preset's vocabulary (a tokenizer is
    trained on the run's data for it: these folders carry none), experts of `width`."""
    common = dict(
        vocab_size=320,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        rms_norm_eps=1e-5,
    )
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=width, num_local_experts=4, head_dim=8, **common)
    elif kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            moe_intermediate_size=width, num_experts=4, norm_topk_prob=True, head_dim=8, **common
        )
    elif kind == "olmoe":
        cfg = transformers.OlmoeConfig(intermediate_size=width, num_experts=4, norm_topk_prob=False, **common)
    elif kind == "ernie4_5_moe":  # layer 0 dense, 2 shared experts, a selection bias, pair RoPE
        cfg = transformers.Ernie4_5_MoeConfig(
            moe_intermediate_size=width,
            intermediate_size=40,
            moe_num_experts=4,
            moe_num_shared_experts=2,
            moe_layer_start_index=1,
            **common,
        )
    elif kind == "glm4_moe":  # layer 0 dense, sigmoid router with a selection bias, partial RoPE
        rope = {**common["rope_parameters"], "partial_rotary_factor": 0.5}
        cfg = transformers.Glm4MoeConfig(
            moe_intermediate_size=width,
            intermediate_size=40,
            n_routed_experts=4,
            n_shared_experts=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.0,
            use_qk_norm=True,
            head_dim=8,
            **{**common, "rope_parameters": rope},
        )
    else:
        cfg = transformers.Qwen2MoeConfig(
            moe_intermediate_size=width,
            shared_expert_intermediate_size=16,
            num_experts=4,
            norm_topk_prob=False,
            qkv_bias=True,
            **common,
        )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # away from transformers' init (unit norms, zero routers)
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


def saved(tmp_path, kind: str):
    hf_moe(kind).save_pretrained(tmp_path / kind)
    return tmp_path / kind


def test_the_teacher_is_the_frozen_original(tmp_path, monkeypatch):
    """Every elastic step distils from the imported original: the same module at every step, its
    weights never moving (while the student's do), its logits transformers' logits of the source."""
    src = saved(tmp_path, "mixtral")
    original = import_hf(src)
    reference = {k: v.clone() for k, v in original.state_dict().items()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    seen = []
    real_step = trainmod.train_step

    def spy(model, opt, x, y, subnets, recipe, par, step, teacher=None, doc_eos=None):
        assert doc_eos is None  # micro: packed rows unmasked, so the teacher's check below is like for like
        assert teacher is not None and teacher is not model, "the teacher must be a model apart from the student"
        assert not any(p.requires_grad for p in teacher.parameters())
        now = teacher.state_dict()
        moved = [k for k, v in reference.items() if not torch.equal(now[k], v)]
        assert not moved, f"the teacher moved at step {step}: {moved[:3]}"
        with torch.no_grad():
            diff = (teacher(x).logits - hf(x).logits).abs().max().item()
        assert diff <= TOL  # the teacher computes as the original does
        assert len(subnets) >= 2  # elastic from the first step: no full-network warm-up
        seen.append((id(teacher), step))
        return real_step(model, opt, x, y, subnets, recipe, par, step, teacher, doc_eos)

    monkeypatch.setattr(trainmod, "train_step", spy)
    p = plan(src, "micro", ["reorder.at_steps=[2]"], tokens=3 * STEP_TOKENS, lr=1e-2, parent_flops=1e12)
    res = elastify(p, tmp_path / "run", progress=False)
    assert res.step == 3 and [s for _, s in seen] == [0, 1, 2] and len({i for i, _ in seen}) == 1
    run = tmp_path / "run"
    kept, meta = load_model(run / "original")
    assert all(torch.equal(kept.state_dict()[k], v) for k, v in reference.items())
    assert meta["training_flops"] == 1e12 and meta["source_architecture"] == "MixtralForCausalLM"
    parent, pmeta = load_model(run / "parent")
    assert pmeta["kind"] == "elastic-parent" and pmeta["method"] == "elastify"
    assert not all(torch.equal(parent.state_dict()[k], v) for k, v in reference.items())  # the student moved
    # the recipe: no warm-up, the budget in steps, the micro preset's seed (its corpus)
    recipe = load_recipe(run / "recipe.yaml")
    assert recipe.sampling.full_fraction == 0.0 and recipe.train.steps == 3 and recipe.train.seed == 0
    assert recipe.model == original.config and recipe.train.lr == 1e-2
    # the ledger: the one-shot re-ordering and the elastic steps are the run's, teacher forwards included
    led = Ledger(run / "ledger.jsonl")
    assert led.totals("importance", method="elastify")["tokens"] > 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "subnets" in m]
    c, seq = recipe.model, recipe.data.seq_len
    from elasticmoe.cost import cost

    want = sum(
        cost(c, None, seq).flops_forward
        + sum(cost(c, Subnet.parse(s, c), seq).flops_train for s in m["subnets"].values())
        for m in steps
    )
    assert led.totals("train")["flops"] == want * STEP_TOKENS
    assert [m["step"] for m in metrics if "reorder" in m] == [2]


def test_resume_keeps_the_original_as_teacher(tmp_path, cli_main):
    src = saved(tmp_path, "olmoe")
    run = tmp_path / "run"
    p = plan(src, "micro", ["train.ckpt_every=2"], tokens=4 * STEP_TOKENS)
    with pytest.raises(KeyboardInterrupt):  # killed after the first checkpoint
        real = trainmod.train_step

        def stop(*args, **kwargs):
            if args[7] == 3:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        trainmod.train_step = stop
        try:
            elastify(p, run, progress=False)
        finally:
            trainmod.train_step = real
    assert (run / "checkpoints").is_dir() and not (run / "parent").exists()
    assert cli_main("elastify", src, "--out", run, "--resume", "--quiet") == 0
    assert load_model(run / "parent")[1]["steps"] == 4
    original = import_hf(src)
    kept, _ = load_model(run / "original")
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), kept.state_dict().values()))


@pytest.mark.parametrize(
    "kind",
    [
        "qwen2_moe",
        "ernie4_5_moe",
        "glm4_moe",
        pytest.param("mixtral", marks=pytest.mark.slow),
        pytest.param("qwen3_moe", marks=pytest.mark.slow),
        pytest.param("olmoe", marks=pytest.mark.slow),
    ],
)
def test_child_after_elastify_exports_to_the_source_class(tmp_path, cli_main, capsys, kind):
    """The command line end to end: elastify a few steps, extract a child, export it: transformers
    loads it as the source's class with the logits of the elastic parent running that sub-network;
    eval against the original and the report name the original as the reference."""
    src = saved(tmp_path, kind)
    run = tmp_path / "run"
    args = ("elastify", src, "--out", run, "--config", "micro", "--tokens", 3 * STEP_TOKENS, "--quiet")
    assert cli_main(*args, "--parent-flops", "2e12") == 0
    assert "original" in capsys.readouterr().out
    # ERNIE, GLM: keep the dense layer 0
    spec = "L[0,2] E2 k1 W12" if kind in ("ernie4_5_moe", "glm4_moe") else "L2 E2 k1 W12"
    assert cli_main("extract", run, "--subnet", spec, "--out", run / "children" / "c0") == 0
    assert cli_main("export", run / "children" / "c0", "--format", "hf", "--out", tmp_path / "hf") == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == type(hf_moe(kind)).__name__
    parent, _ = load_model(run / "parent")
    subnet = Subnet.parse(spec, parent.config, parent.layer_order)
    x = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(x).logits - parent(x, subnet).logits).abs().max().item() <= TOL
    if kind == "ernie4_5_moe":
        assert hf.config.moe_layer_start_index == 1 and hf.config.num_hidden_layers == 2
    if kind == "glm4_moe":
        assert hf.config.first_k_dense_replace == 1 and hf.config.num_hidden_layers == 2
    if kind != "qwen2_moe":
        return
    results = run / "eval" / "results.json"
    evaluated = ("eval", run / "original", run / "parent", run / "children" / "c0", "--parent", "original")
    assert cli_main(*evaluated, "--examples", 4, "--out", results) == 0
    assert cli_main("report", run) == 0
    report = (run / "report.md").read_text()
    assert "## Against the original model" in report and "Qwen2MoeForCausalLM" in report
    assert "2e+12 FLOPs" in report and "| c0 |" in report and "| original |" in report


def test_unsupported_architecture_is_one_line_and_writes_nothing(tmp_path, cli_main, capsys, one_line_error):
    (tmp_path / "ds").mkdir()
    config = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 32}
    (tmp_path / "ds" / "config.json").write_text(json.dumps(config))
    code = cli_main("elastify", tmp_path / "ds", "--out", tmp_path / "run")
    res = type("Res", (), {"returncode": code, "stderr": capsys.readouterr().err})
    one_line_error(res, "DeepseekV3ForCausalLM")
    for name in ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM"):
        assert name in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "kind,patch",
    [
        ("qwen3_moe", {"moe_intermediate_size": 32}),
        ("ernie4_5_moe", {"moe_layer_start_index": 0}),  # layer 0 would be MoE; the files hold a dense MLP
        ("ernie4_5_moe", {"moe_num_shared_experts": 1}),  # the shared experts' width
        ("glm4_moe", {"first_k_dense_replace": 2}),  # layer 1 would be dense; the files hold experts
    ],
)
def test_weights_not_matching_the_config_refused_before_writing(
    tmp_path, cli_main, capsys, one_line_error, kind, patch
):
    src = saved(tmp_path, kind)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **patch}))
    code = cli_main("elastify", src, "--out", tmp_path / "run", "--config", "micro")
    res = type("Res", (), {"returncode": code, "stderr": capsys.readouterr().err})
    one_line_error(res, "do not match config.json")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_readmes_elastify_commands_run_as_written(tmp_path, capsys, monkeypatch):
    """README "Start from your own MoE": its command block, as written, on a random Qwen2-MoE folder
    (the micro preset's knobs, a few steps instead of the tiny budgets, and looser ratios: the
    embeddings of so small a model outweigh its experts)."""
    import shlex
    from pathlib import Path

    from elasticmoe import cli

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text[text.index("## Start from your own MoE") :].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(ln.split("  #")[0])[1:] for ln in block.splitlines() if ln.startswith("elasticmoe ")]
    assert [c[0] for c in commands] == ["elastify", "search", "extract", "finetune", "export", "eval", "report"]
    monkeypatch.chdir(tmp_path)
    # widths a multiple of 4 floats: transformers' grouped expert kernel wants 16-byte strides
    hf_moe("qwen2_moe", width=32).save_pretrained(tmp_path / "path" / "to" / "hf-folder")
    for args in commands:
        args = [str(3 * STEP_TOKENS) if a in ("409600", "102400") else a for a in args]
        args = ["0.9" if a in ("1/3", "1/2") else a for a in args]
        if args[0] == "elastify":
            args += ["--config", "micro"]
        code = cli.main(args)
        assert code == 0, (args, capsys.readouterr().err[-2000:])
    report = (tmp_path / "runs" / "mine" / "report.md").read_text()
    assert "## Against the original model" in report and "| c0-ft |" in report
    assert (tmp_path / "runs" / "mine" / "hf" / "c0" / "config.json").is_file()
