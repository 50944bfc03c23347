"""Hugging Face transformers export/import: stock-architecture parity, round trips, hostile folders.

Everything offline: transformers models are built from configs, tokenizers from the `tokenizers`
library in memory.
"""

import json
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from elasticmoe import checkpoint  # noqa: E402
from elasticmoe.config import ConfigError, ElasticSpace  # noqa: E402
from elasticmoe.extract import extract_to_folder  # noqa: E402
from elasticmoe.hf import HFError, export_hf, max_logit_diff_hf  # noqa: E402
from elasticmoe.hf_import import import_hf  # noqa: E402
from elasticmoe.model import ElasticMoE  # noqa: E402
from elasticmoe.subnet import LayerSpec, Subnet  # noqa: E402

TOL = 1e-4


def make_model(config, seed=0) -> ElasticMoE:
    torch.manual_seed(seed)
    model = ElasticMoE(config)
    with torch.no_grad():  # norms away from 1 so a misplaced norm shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def load_hf(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval()


def tokens_for(config, batch=2, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=g)


def write_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["<|endoftext|>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return path


@pytest.mark.parametrize("qk_norm,arch", [(False, "MixtralForCausalLM"), (True, "Qwen3MoeForCausalLM")])
@pytest.mark.parametrize("tied", [False, True])
def test_export_logits_match(tiny_config, tmp_path, qk_norm, arch, tied):
    config = replace(tiny_config, qk_norm=qk_norm, tie_embeddings=tied, rope_theta=500.0, norm_eps=1e-5)
    model = make_model(config)
    tokens = tokens_for(config)
    record = export_hf(model, tmp_path / "hf", provenance={"note": "parity test"}, verify_tokens=tokens)
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == arch
    assert "lm_head.weight" not in load_file(str(tmp_path / "hf" / "model.safetensors")) or not tied
    diff = max_logit_diff_hf(model, hf, tokens_for(config, 3, 40, seed=2))
    assert diff <= TOL
    assert record["hf_verification"]["max_abs_logit_diff"] <= TOL
    assert hf.config.elasticmoe_provenance["note"] == "parity test"
    card = (tmp_path / "hf" / "README.md").read_text()
    assert arch in card and "parity test" in card


@pytest.mark.parametrize("width, padded", [(2, 4), (6, 8)])
def test_narrow_experts_export_padded_with_zero_units(tiny_config, tmp_path, width, padded):
    """transformers' grouped-GEMM expert kernel refuses widths whose rows are not 16-byte multiples
    (2 or 6 float32 units): the export pads the experts with zero units to a multiple of 4, which
    changes no logit, and says so in the record and the card; the exported model runs in transformers."""
    model = make_model(replace(tiny_config, expert_width=width))
    record = export_hf(model, tmp_path / "hf", verify_tokens=tokens_for(model.config))
    assert record["expert_width_padded"]["width"] == width and record["expert_width_padded"]["exported"] == padded
    hf = load_hf(tmp_path / "hf")
    assert hf.config.intermediate_size == padded
    assert max_logit_diff_hf(model, hf, tokens_for(model.config, 3, 40, seed=2)) <= TOL
    assert f"expert width {width} stored as {padded} with zero units" in (tmp_path / "hf" / "README.md").read_text()
    assert model.config.expert_width == width  # the caller's model is not touched


def test_export_keys_identical_to_save_pretrained(tiny_config, tmp_path):
    for qk_norm in (False, True):
        export_hf(make_model(replace(tiny_config, qk_norm=qk_norm)), tmp_path / f"ours{qk_norm}")
        load_hf(tmp_path / f"ours{qk_norm}").save_pretrained(tmp_path / f"theirs{qk_norm}")
        ours = load_file(str(tmp_path / f"ours{qk_norm}" / "model.safetensors"))
        theirs = load_file(str(tmp_path / f"theirs{qk_norm}" / "model.safetensors"))
        assert sorted(ours) == sorted(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_extracted_child_exports_with_provenance_and_tokenizer(tiny_config, tmp_path):
    parent = make_model(replace(tiny_config, qk_norm=True))
    subnet = Subnet.uniform([0, 2], 3, 1, 16)
    tok = write_tokenizer(tmp_path / "tokenizer.json", tiny_config.vocab_size)
    tokens = tokens_for(tiny_config)
    extract_to_folder(parent, subnet, tmp_path / "child", tokens, tokenizer_path=tok, parent_meta={"path": "parent"})
    record = export_hf(tmp_path / "child", tmp_path / "hf", verify_tokens=tokens)
    hf = load_hf(tmp_path / "hf")
    assert hf.config.num_hidden_layers == 2 and hf.config.num_experts == 3 and hf.config.num_experts_per_tok == 1
    diff = max_logit_diff_hf(checkpoint.load_model(tmp_path / "child")[0], hf, tokens_for(tiny_config, seed=3))
    assert diff <= TOL
    assert (hf(tokens).logits - parent(tokens, subnet).logits).abs().max() <= TOL
    assert record["subnet"] == str(subnet) and record["parent"]["path"] == "parent"
    assert hf.config.elasticmoe_provenance["verification"]["max_abs_logit_diff"] <= TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    eos = tiny_config.vocab_size - 1
    assert hf_tok.eos_token == hf_tok.bos_token == hf_tok.pad_token == "<|endoftext|>"
    assert hf_tok.eos_token_id == eos and hf.config.eos_token_id == eos
    assert hf.generation_config.eos_token_id == eos
    assert "sub-network" in (tmp_path / "hf" / "README.md").read_text()


@pytest.mark.parametrize("qk_norm", [False, True])
def test_greedy_generation_matches(tiny_config, tmp_path, qk_norm):
    config = replace(tiny_config, qk_norm=qk_norm)
    model = make_model(config, seed=4)
    with torch.no_grad():  # sharper logits: fewer near-ties for argmax to break differently
        model.embed.weight.mul_(20.0)
    export_hf(model, tmp_path / "hf")
    hf = load_hf(tmp_path / "hf")
    prompt = tokens_for(config, 2, 6, seed=5)
    ours = model.generate(prompt, 32)
    theirs = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours.shape == (2, 38)
    assert torch.equal(ours, theirs)


def random_hf_model(kind: str, tied: bool):
    common = dict(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        rms_norm_eps=1e-5,
    )
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=20, num_local_experts=4, **common)
    elif kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=20, num_experts=4, norm_topk_prob=True, **common)
    elif kind == "olmoe":  # q/k norm over the whole projection, top-k weights not renormalised
        cfg = transformers.OlmoeConfig(intermediate_size=20, num_experts=4, norm_topk_prob=False, **common)
    elif kind == "ernie4_5_moe":  # a leading dense layer, 2 ungated shared experts, a selection bias, pair RoPE
        cfg = transformers.Ernie4_5_MoeConfig(
            moe_intermediate_size=24,  # W16 and W8 children: widths divide the shared 2 x 24
            intermediate_size=36,
            moe_num_experts=4,
            moe_num_shared_experts=2,
            moe_layer_start_index=1,
            **common,
        )
    elif kind == "glm4_moe":  # ERNIE's layout with a sigmoid router, scaled weights, partial RoPE, q/k norm
        cfg = transformers.Glm4MoeConfig(
            moe_intermediate_size=24,
            intermediate_size=36,
            n_routed_experts=4,
            n_shared_experts=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            attention_bias=True,
            use_qk_norm=True,
            **{**common, "rope_parameters": {**common["rope_parameters"], "partial_rotary_factor": 0.5}},
        )
    else:  # qwen2_moe: a shared expert with its sigmoid gate, q/k/v biases, top-k not renormalised
        cfg = transformers.Qwen2MoeConfig(
            moe_intermediate_size=20,
            shared_expert_intermediate_size=12,
            num_experts=4,
            norm_topk_prob=False,
            qkv_bias=True,
            **common,
        )
    torch.manual_seed(6)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # transformers' init leaves norms at 1 and may zero routers (and ERNIE's bias)
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


KINDS = [
    ("mixtral", False),
    ("qwen3_moe", True),
    ("olmoe", False),
    ("qwen2_moe", False),
    ("qwen2_moe", True),
    ("ernie4_5_moe", False),
    ("ernie4_5_moe", True),
    ("glm4_moe", False),
]
SHARED = {"qwen2_moe": (12, True), "ernie4_5_moe": (48, False), "glm4_moe": (48, False)}  # (width, gate)


@pytest.mark.parametrize("kind,tied", KINDS)
def test_import_export_round_trip(tmp_path, kind, tied):
    """Import, the unchanged parent's logits, its export back to the source class and re-import."""
    hf = random_hf_model(kind, tied)
    hf.save_pretrained(tmp_path / "src")
    model = import_hf(tmp_path / "src", space=ElasticSpace((1, 2), (2, 4), (1, 2), (10, 20)))
    c = model.config
    assert c.source_architecture == type(hf).__name__ and c.tie_embeddings == tied
    assert c.qk_norm == (kind in ("qwen3_moe", "olmoe", "glm4_moe"))
    assert c.qk_norm_scope == ("all" if kind == "olmoe" else "head")
    assert c.renormalize_top_k == (kind in ("mixtral", "qwen3_moe", "ernie4_5_moe", "glm4_moe"))
    assert c.qkv_bias == (kind in ("qwen2_moe", "glm4_moe"))
    assert (c.shared_expert_width, c.shared_expert_gate) == SHARED.get(kind, (0, False))
    layout = kind in ("ernie4_5_moe", "glm4_moe")
    assert (c.dense_layers, c.dense_width, c.router_bias) == (((0,), 36, True) if layout else ((), 0, False))
    glm = kind == "glm4_moe"
    assert (c.router_score, c.routed_scale, c.rope_dims) == (("sigmoid", 2.5, 4) if glm else ("softmax", 1.0, 0))
    assert c.rope_theta == 1000.0 and c.norm_eps == 1e-5
    tokens = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(7))
    assert max_logit_diff_hf(model, hf, tokens) <= TOL
    export_hf(model, tmp_path / "out")
    out = load_hf(tmp_path / "out")
    assert type(out) is type(hf)
    assert (out(tokens).logits - hf(tokens).logits).abs().max() <= TOL  # transformers vs transformers
    again = import_hf(tmp_path / "out")
    assert again.config == c
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("kind", ["olmoe", "qwen2_moe", "ernie4_5_moe", "glm4_moe"])
def test_child_exports_to_source_class(tmp_path, kind):
    """A child of an imported parent is its source's class in transformers, with the logits of the
    parent running that sub-network; a shared expert and its gate come through whole, and so does
    ERNIE's dense layer 0 (the first child drops it by depth, the second keeps it)."""
    random_hf_model(kind, False).save_pretrained(tmp_path / "src")
    parent = import_hf(tmp_path / "src")
    tokens = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(8))
    for n, subnet in enumerate([Subnet.uniform([1], 3, 1, 16), Subnet.uniform([0, 1], 2, 2, 8)]):
        extract_to_folder(parent, subnet, tmp_path / f"child{n}", tokens)
        export_hf(tmp_path / f"child{n}", tmp_path / f"hf{n}", verify_tokens=tokens)
        hf = load_hf(tmp_path / f"hf{n}")
        assert type(hf).__name__ == parent.config.source_architecture
        experts = hf.config.n_routed_experts if kind == "glm4_moe" else hf.config.num_experts
        assert experts == subnet.specs[0].experts
        assert (hf(tokens).logits - parent(tokens, subnet).logits).abs().max() <= TOL
        child = checkpoint.load_model(tmp_path / f"child{n}")[0]
        assert child.config.shared_expert_width == parent.config.shared_expert_width
        kept = dict(child.named_parameters())
        for name, w in parent.blocks[subnet.layers[-1]].moe.named_parameters():
            if name.startswith("shared"):
                assert torch.equal(kept[f"blocks.{subnet.depth - 1}.moe.{name}"], w)
        if kind == "glm4_moe":
            assert hf.config.first_k_dense_replace == (1 if 0 in subnet.layers else 0)
        if kind in ("ernie4_5_moe", "glm4_moe"):
            assert child.config.dense_layers == ((0,) if 0 in subnet.layers else ())
            if kind == "ernie4_5_moe":
                assert hf.config.moe_layer_start_index == (1 if 0 in subnet.layers else 0)
            kept_bias = parent.blocks[1].moe.router_bias[: subnet.specs[0].experts]
            assert torch.equal(child.blocks[-1].moe.router_bias, kept_bias)
            for name, w in parent.blocks[0].mlp.named_parameters():
                if 0 in subnet.layers:
                    assert torch.equal(kept[f"blocks.0.mlp.{name}"], w)  # the dense layer, whole


def test_unsupported_architecture_is_one_line(tmp_path, cli_main, capsys, one_line_error):
    """A folder of an architecture we do not import: one line naming it and the supported ones."""
    (tmp_path / "ds").mkdir()
    config = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 32}
    (tmp_path / "ds" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFError) as err:
        import_hf(tmp_path / "ds")
    message = str(err.value)
    assert "\n" not in message and "'deepseek_v3' (DeepseekV3ForCausalLM) is not supported" in message
    for name in ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM"):
        assert name in message
    code = cli_main("import-hf", tmp_path / "ds", "--out", tmp_path / "run")
    res = type("Res", (), {"returncode": code, "stderr": capsys.readouterr().err})
    one_line_error(res, "DeepseekV3ForCausalLM")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "kind,patch,match",
    [
        ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
        ("olmoe", {"head_dim": 4}, "head_dim"),
        ("qwen2_moe", {"shared_expert_intermediate_size": 0}, "shared expert"),
        ("qwen2_moe", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
        ("qwen2_moe", {"decoder_sparse_step": 2}, "dense"),
    ],
)
def test_new_architectures_refuse_what_they_cannot_reproduce(tmp_path, kind, patch, match):
    random_hf_model(kind, False).save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **patch}))
    with pytest.raises(HFError, match=match):
        import_hf(tmp_path / "src")


def test_export_refuses_what_the_source_class_lacks(tiny_config, tmp_path):
    olmoe = replace(tiny_config, qk_norm=True, source_architecture="OlmoeForCausalLM")
    with pytest.raises(HFError, match="OlmoeForCausalLM has a whole-projection q/k RMSNorm"):
        export_hf(make_model(olmoe), tmp_path / "a")
    with pytest.raises(HFError, match="needs a shared expert"):
        export_hf(make_model(replace(tiny_config, source_architecture="Qwen2MoeForCausalLM")), tmp_path / "b")
    with pytest.raises(HFError, match="always renormalises"):
        export_hf(make_model(replace(tiny_config, renormalize_top_k=False)), tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_ernie_selection_bias_follows_its_expert(tmp_path):
    """ERNIE-4.5's selection bias decides the top-k (zeroing it changes the logits), moves with its
    expert when experts are re-ordered (the full model's function unchanged) and is sliced with the
    kept experts; the parent re-ordered by importance still exports exactly."""
    from elasticmoe.extract import extract
    from elasticmoe.reorder import permute_experts, reorder

    random_hf_model("ernie4_5_moe", False).save_pretrained(tmp_path / "src")
    model = import_hf(tmp_path / "src")
    tokens = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(9))
    before = model(tokens).logits
    bias = model.blocks[1].moe.router_bias.clone()
    plain = import_hf(tmp_path / "src")
    plain.blocks[1].moe.router_bias.zero_()
    assert (plain(tokens).logits - before).abs().max() > 1e-3  # the bias changes which experts are chosen
    perm = torch.tensor([2, 0, 3, 1])
    permute_experts(model, 1, perm)
    assert torch.equal(model.blocks[1].moe.router_bias, bias[perm])
    assert (model(tokens).logits - before).abs().max() <= 1e-5
    child = extract(model, Subnet.uniform([0, 1], 2, 1, 24))
    assert torch.equal(child.blocks[1].moe.router_bias, bias[perm][:2])
    summary = reorder(model, [tokens])
    assert summary["expert_perms"][0] == [] and sorted(summary["expert_perms"][1]) == [0, 1, 2, 3]
    assert (model(tokens).logits - before).abs().max() <= 1e-5
    export_hf(model, tmp_path / "out", verify_tokens=tokens)
    assert max_logit_diff_hf(model, load_hf(tmp_path / "out"), tokens) <= TOL


def test_glm_refusals_and_its_prediction_layer(tmp_path):
    """GLM-4.5's group-limited top-k (more than one group) is refused; its multi-token-prediction
    layer's weights (after the last layer) are left out, as transformers leaves them; a dense layer
    that is not among the first is refused on export."""
    random_hf_model("glm4_moe", False).save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    base = json.loads(path.read_text())
    path.write_text(json.dumps({**base, "n_group": 2, "topk_group": 1}))
    with pytest.raises(HFError, match="group-limited top-k"):
        import_hf(tmp_path / "src")
    path.write_text(json.dumps({**base, "num_nextn_predict_layers": 1}))
    weights = tmp_path / "src" / "model.safetensors"
    tensors = load_file(str(weights))
    mtp = {"model.layers.2.eh_proj.weight": torch.zeros(32, 64)}  # the layer after the last
    save_file({**tensors, **mtp}, str(weights), metadata={"format": "pt"})
    model = import_hf(tmp_path / "src")
    path.write_text(json.dumps({**base, "num_nextn_predict_layers": 0}))
    with pytest.raises(HFError, match="unexpected tensors"):
        import_hf(tmp_path / "src")
    with pytest.raises(HFError, match="first_k_dense_replace"):
        export_hf(make_model(replace(model.config, dense_layers=(1,))), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["ernie4_5_moe", "glm4_moe"])
def test_released_style_configs_import(tmp_path, kind):
    """config.json as the released ERNIE-4.5 / GLM-4.5 folders write it (transformers 4.x style: a
    top-level rope_theta, GLM's top-level partial_rotary_factor, no rope_parameters, and fields
    neither transformers nor we use) imports to the same model, with transformers' logits."""
    random_hf_model(kind, False).save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rope_theta=rope["rope_theta"], torch_dtype="bfloat16", use_cache=False)
    if kind == "ernie4_5_moe":
        cfg.update(moe_gate="top2_fused", moe_capacity=[64, 64, 64], moe_use_aux_free=True, use_rmsnorm=True)
        cfg.update(moe_layer_end_index=-1, head_dim=8)
    else:
        cfg.update(partial_rotary_factor=rope["partial_rotary_factor"], num_nextn_predict_layers=1)
    path.write_text(json.dumps(cfg))
    model = import_hf(tmp_path / "src")
    assert model.config.dense_layers == (0,) and model.config.rope_theta == 1000.0
    assert model.config.rope_dims == (4 if kind == "glm4_moe" else 0)
    tokens = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(10))
    assert max_logit_diff_hf(model, load_hf(tmp_path / "src"), tokens) <= TOL


def test_ernie_layouts_and_refusals(tiny_config, tmp_path):
    """ERNIE's MoE-layer pattern (start, end, interval) is found for any dense set it can state and
    refused otherwise; its mechanisms are refused by the other classes; use_bias is refused at
    import; a layout llama.cpp cannot place (MoE layers ending before the last) gets one GGUF line
    saying to use --format hf."""
    from elasticmoe.gguf_export import export_gguf
    from elasticmoe.hf import ernie_moe_layers

    shared = 2 * tiny_config.expert_width
    ernie = replace(tiny_config, source_architecture="Ernie4_5_MoeForCausalLM", shared_expert_width=shared, layers=6)
    assert ernie_moe_layers(replace(ernie, dense_layers=(0,), dense_width=8)) == (1, 5, 1)
    assert ernie_moe_layers(replace(ernie, dense_layers=(0, 2, 4), dense_width=8)) == (1, 5, 2)
    assert ernie_moe_layers(replace(ernie, dense_layers=(0, 5), dense_width=8)) == (1, 4, 1)
    assert ernie_moe_layers(replace(ernie, dense_layers=(0, 1, 2, 3, 4, 5), dense_width=8)) == (6, 5, 1)
    with pytest.raises(HFError, match="moe_layer_interval"):
        export_hf(make_model(replace(ernie, dense_layers=(0, 2, 3), dense_width=8)), tmp_path / "a")
    with pytest.raises(HFError, match="not a multiple of expert_width"):
        export_hf(make_model(replace(ernie, shared_expert_width=40)), tmp_path / "b")
    with pytest.raises(HFError, match="no dense"):
        export_hf(make_model(replace(tiny_config, dense_layers=(0,), dense_width=8)), tmp_path / "c")
    with pytest.raises(HFError, match="selection bias"):
        export_hf(make_model(replace(tiny_config, router_bias=True)), tmp_path / "d")
    tok = write_tokenizer(tmp_path / "tokenizer.json", tiny_config.vocab_size)
    with pytest.raises(HFError, match="use --format hf"):
        export_gguf(make_model(replace(ernie, dense_layers=(0, 5), dense_width=8)), tmp_path / "e", tokenizer_path=tok)
    assert list(tmp_path.iterdir()) == [tok]
    random_hf_model("ernie4_5_moe", False).save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "config.json"
    base = json.loads(path.read_text())
    path.write_text(json.dumps({**base, "use_bias": True}))
    with pytest.raises(HFError, match="use_bias"):
        import_hf(tmp_path / "src")
    path.write_text(json.dumps(base))  # its multi-token-prediction weights are left out, as transformers does
    weights = tmp_path / "src" / "model.safetensors"
    mtp = {"model.mtp_linear_proj.0.weight": torch.zeros(32, 64), "model.mtp_emb_norm.0.weight": torch.ones(32)}
    save_file({**load_file(str(weights)), **mtp}, str(weights), metadata={"format": "pt"})
    assert import_hf(tmp_path / "src").config.router_bias
    save_file({**load_file(str(weights)), "model.extra.weight": torch.ones(32)}, str(weights))
    with pytest.raises(HFError, match="unexpected tensors"):
        import_hf(tmp_path / "src")


def test_import_space_validated(tmp_path):
    random_hf_model("mixtral", False).save_pretrained(tmp_path / "src")
    with pytest.raises(ConfigError, match="experts"):
        import_hf(tmp_path / "src", space=ElasticSpace((2,), (8,), (2,), (20,)))


# -- hostile and unsupported folders -----------------------------------------------------------
@pytest.fixture
def good_folder(tiny_config, tmp_path):
    export_hf(make_model(tiny_config), tmp_path / "good")
    import_hf(tmp_path / "good")  # sanity: the untouched folder imports
    return tmp_path / "good"


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "extra/optimizer.pth", "x.pkl"])
def test_pickle_beside_safetensors_refused(good_folder, name):
    (good_folder / name).parent.mkdir(exist_ok=True)
    (good_folder / name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(HFError, match="pickle"):
        import_hf(good_folder)


def test_remote_code_refused(good_folder):
    cfg = json.loads((good_folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (good_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFError, match="auto_map"):
        import_hf(good_folder)
    del cfg["auto_map"]
    (good_folder / "config.json").write_text(json.dumps(cfg))
    (good_folder / "modeling_evil.py").write_text("raise SystemExit('ran code from the folder')\n")
    with pytest.raises(HFError, match="Python files"):
        import_hf(good_folder)


def test_unsupported_config_refused(good_folder):
    path = good_folder / "config.json"
    base = json.loads(path.read_text())
    cases = [
        ({"model_type": "llama"}, "model_type"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type"),
        ({"sliding_window": 16}, "sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ]
    for patch, match in cases:
        path.write_text(json.dumps({**base, **patch}))
        with pytest.raises(HFError, match=match):
            import_hf(good_folder)


def test_qwen3_dense_layers_refused(tiny_config, tmp_path):
    export_hf(make_model(replace(tiny_config, qk_norm=True)), tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    base = json.loads(path.read_text())
    for patch in ({"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}):
        path.write_text(json.dumps({**base, **patch}))
        with pytest.raises(HFError, match="dense"):
            import_hf(tmp_path / "q")
    path.write_text(json.dumps({**base, "norm_topk_prob": False}))  # imported as its router computes
    assert import_hf(tmp_path / "q").config.renormalize_top_k is False


def test_header_lying_about_shapes_refused(good_folder):
    weights = good_folder / "model.safetensors"
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    key = "model.layers.0.self_attn.k_proj.weight"  # (16, 32): claim (32, 16), same byte count
    header[key]["shape"] = header[key]["shape"][::-1]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    weights.write_bytes(raw[:8] + text + raw[8 + n :])
    with pytest.raises(HFError, match="shapes disagree.*k_proj"):
        import_hf(good_folder)
    header[key]["shape"] = [999, 32]  # larger than the bytes stored: safetensors' own check fails
    weights.write_bytes(raw[:8] + json.dumps(header, separators=(",", ":")).encode().ljust(n) + raw[8 + n :])
    with pytest.raises(HFError, match="invalid safetensors header"):
        import_hf(good_folder)


def test_wrong_or_missing_tensors_refused(good_folder):
    weights = good_folder / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.0.block_sparse_moe.gate.weight"] = torch.zeros(3, 32)
    del tensors["model.layers.1.block_sparse_moe.experts.0.w1.weight"]
    tensors["model.layers.0.block_sparse_moe.bias"] = torch.zeros(4)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(HFError) as err:
        import_hf(good_folder)
    message = str(err.value)
    assert "gate.weight" in message and "experts.0.w1" in message and "block_sparse_moe.bias" in message


def test_shared_expert_and_per_layer_export_refused(tiny_config, tmp_path):
    with pytest.raises(HFError, match="shared"):
        export_hf(make_model(replace(tiny_config, shared_expert_width=16)), tmp_path / "a")
    parent = make_model(tiny_config)
    subnet = Subnet((0, 1), (LayerSpec(2, 1, 8), LayerSpec(4, 2, 24)))
    extract_to_folder(parent, subnet, tmp_path / "child", tokens_for(tiny_config))
    with pytest.raises(HFError, match="per-layer"):
        export_hf(tmp_path / "child", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_failed_export_verification_leaves_nothing(tiny_config, tmp_path):
    model = make_model(tiny_config)
    with pytest.raises(HFError, match="does not reproduce"):
        export_hf(model, tmp_path / "hf", verify_tokens=tokens_for(tiny_config), tolerance=-1)
    assert list(tmp_path.iterdir()) == []


def test_wordlevel_tokenizer_files(tiny_config, tmp_path):
    tok = write_tokenizer(tmp_path / "tokenizer.json", tiny_config.vocab_size)
    export_hf(make_model(tiny_config), tmp_path / "hf", tokenizer_path=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    eos = tiny_config.vocab_size - 1
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == eos  # no <|pad|> in this tokenizer: pad falls back
    assert hf_tok("w3 w5")["input_ids"] == [eos, 3, 5]  # the prompt convention: <|endoftext|> first
    assert hf_tok.decode(hf_tok("w3 w5", add_special_tokens=False)["input_ids"]) == "w3 w5"
    assert load_hf(tmp_path / "hf").config.bos_token_id == eos


# -- older readers, prompt convention, model card ----------------------------------------------
def test_config_states_what_older_readers_need(tiny_config, tmp_path):
    """transformers 4.x (4.57 is what llama.cpp's converter pins) reads `rope_theta` and
    `torch_dtype` at the top level and falls back to Mixtral's theta 1e6 without it. Installing
    4.57 beside 5.x in CI costs a second environment, so this checks the fields explicitly and
    loads a config.json stripped to what 4.x reads (no `rope_parameters`, no `dtype`)."""
    config = replace(tiny_config, rope_theta=500.0)
    model = make_model(config)
    tok = write_tokenizer(tmp_path / "tokenizer.json", config.vocab_size)
    export_hf(model, tmp_path / "hf", tokenizer_path=tok)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 500.0
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert cfg["transformers_version"] == transformers.__version__
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == config.max_seq_len
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")).model_max_length == config.max_seq_len
    old_style = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "dtype")}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(old_style))
    assert load_hf(tmp_path / "hf").config.rope_parameters["rope_theta"] == 500.0
    assert max_logit_diff_hf(model, load_hf(tmp_path / "hf"), tokens_for(config)) <= TOL


def test_export_without_tokens_checks_random_ids(tiny_config, tmp_path):
    record = export_hf(make_model(tiny_config), tmp_path / "hf")
    check = record["hf_verification"]
    assert check["max_abs_logit_diff"] <= TOL and check["tokens_verified"] > 0
    assert "random" in check["tokens"]
    assert "random token ids" in (tmp_path / "hf" / "README.md").read_text()
    record = export_hf(make_model(tiny_config), tmp_path / "hf2", verify=False)
    assert record["hf_verification"] == {"skipped": "verify=False"}
    assert "NOT checked" in (tmp_path / "hf2" / "README.md").read_text()


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    from elasticmoe.data import build_default_corpus
    from elasticmoe.tokenizer import train_tokenizer

    corpus = build_default_corpus(seed=0, scale=0.02, text_fraction=0.3)
    folder = tmp_path_factory.mktemp("tok")
    return train_tokenizer(corpus.texts("train"), vocab_size=320, out_path=folder), folder / "tokenizer.json"


def test_pipeline_answers_as_our_eval_does(tiny_config, tmp_path, trained_tokenizer):
    """A stock `pipeline("text-generation")` call gets `<|endoftext|>` + prompt, as `evaluate` feeds
    it, and its greedy answer equals ours; pad has its own id, so inferred attention masks hold."""
    from elasticmoe.evaluate import greedy_continuations

    tokenizer, tok_file = trained_tokenizer
    config = replace(tiny_config, vocab_size=tokenizer.vocab_size)
    model = make_model(config, seed=4)
    with torch.no_grad():
        model.embed.weight.mul_(20.0)  # sharper logits: no near-ties for argmax to break differently
    export_hf(model, tmp_path / "hf", tokenizer_path=tok_file)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    prompts = ["k3=v7 k9=v2 k3=", "12+30=", "sort: 5 2 9 ->"]
    for p in prompts:
        assert hf_tok(p)["input_ids"] == [tokenizer.eos_id] + tokenizer.encode(p)
    assert hf_tok.pad_token == "<|pad|>" and hf_tok.pad_token_id == tokenizer.pad_id != tokenizer.eos_id
    gen = transformers.pipeline("text-generation", model=load_hf(tmp_path / "hf"), tokenizer=hf_tok)
    theirs = [gen(p, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"] for p in prompts]
    ours = greedy_continuations(model, tokenizer, prompts, 6)
    assert [t.split("\n")[0] for t in theirs] == ours


def test_model_card_has_cost_eval_convention_and_usage(tiny_config, tmp_path, trained_tokenizer):
    from elasticmoe.cost import cost
    from elasticmoe.ledger import Ledger
    from elasticmoe.tokenizer import PROMPT_CONVENTION

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    ledger = Ledger(run / "ledger.jsonl")
    for phase, model, tokens in (("train", "parent", 123456), ("extract", "L[0,2] E3 k1 W16", 64)):
        ledger.append(
            {
                "event": "end",
                "status": "ok",
                "phase": phase,
                "model": model,
                "tokens": tokens,
                "flops": 10 * tokens,
                "seconds": 1.5,
                "device": "cpu",
                "world_size": 1,
            }
        )
    result = {"tasks": {"kv": {"metric": "exact_match", "score": 0.25, "ci": [0.1, 0.4]}}}
    (run / "eval" / "results.json").write_text(json.dumps({"models": {"child": result, "parent": result}}))
    parent = make_model(tiny_config)
    subnet = Subnet.uniform([0, 2], 3, 1, 16)
    _, tok_file = trained_tokenizer
    extract_to_folder(parent, subnet, tmp_path / "child", tokens_for(tiny_config), parent_meta={"path": str(run)})
    export_hf(tmp_path / "child", tmp_path / "hf", verify_tokens=tokens_for(tiny_config))
    card = (tmp_path / "hf" / "README.md").read_text()
    child = checkpoint.load_model(tmp_path / "child")[0]
    k = cost(child.config)
    assert f"{k.total_params:,} / {k.active_params:,}" in card
    assert str(subnet) in card and "/run`" in card and str(tmp_path) not in card  # named, no absolute path
    assert "123,456" in card and "| parent training (whole run) | 123k |" in card
    assert "| extraction of this sub-network | 64 |" in card
    assert "| results.json | child | kv | exact_match | 0.250 [0.100, 0.400] |" in card
    assert PROMPT_CONVENTION in card and "AutoModelForCausalLM" in card and "--format gguf" in card


@pytest.mark.parametrize("kind", ["qwen3_moe", "ernie4_5_moe", "glm4_moe"])
def test_import_keeps_the_source_dtype(tmp_path, kind):
    """A bf16 folder imports as bf16, value for value (no float32 copy of the model is made; ERNIE's
    routers, float32 in its bf16 files as transformers keeps them, stay float32, and so do the
    selection biases); the saved parent loads as float32 with the same values, and its logits are
    transformers' own on those weights."""
    random_hf_model(kind, False).save_pretrained(tmp_path / "f32")
    transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "f32"), dtype=torch.bfloat16).save_pretrained(
        tmp_path / "src"
    )
    model = import_hf(tmp_path / "src")
    routers = {n for n, _ in model.named_parameters() if n.endswith("router.weight")}
    assert {p.dtype for n, p in model.named_parameters() if n not in routers} == {torch.bfloat16}
    router_dtype = torch.float32 if kind == "ernie4_5_moe" else torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if n in routers} == {router_dtype}
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if n.endswith("router_bias"))
    with torch.no_grad():  # runs as it is (a float32 router reads its input in float32)
        assert model(torch.zeros(1, 4, dtype=torch.long)).logits.dtype == torch.bfloat16
    files = load_file(str(tmp_path / "src" / "model.safetensors"))
    assert torch.equal(model.blocks[1].moe.w_up[3], files["model.layers.1.mlp.experts.3.up_proj.weight"])
    assert torch.equal(model.embed.weight, files["model.embed_tokens.weight"])
    checkpoint.save_model(tmp_path / "ours", model)
    ours, _ = checkpoint.load_model(tmp_path / "ours")
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    assert torch.equal(ours.blocks[1].moe.w_up.to(torch.bfloat16), model.blocks[1].moe.w_up)
    tokens = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(9))
    assert max_logit_diff_hf(ours, load_hf(tmp_path / "src"), tokens) <= TOL  # read as float32 by transformers
    mixed = import_hf(tmp_path / "src", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(mixed.state_dict().values(), ours.state_dict().values()))
