"""ModelConfig / ElasticSpace: serialisation round trips and validation messages."""

import json

import pytest
import yaml

from elasticmoe.config import ConfigError, ElasticSpace, ModelConfig, apply_overrides, dump_yaml, load_mapping


@pytest.fixture
def rich_config() -> ModelConfig:
    """Non-default values in every field, per-layer shapes included, so a dropped field shows."""
    return ModelConfig(
        vocab_size=101,
        d_model=48,
        layers=3,
        heads=6,
        kv_heads=3,
        head_dim=8,
        experts=6,
        top_k=3,
        expert_width=40,
        shared_expert_width=16,
        rope_theta=5e5,
        norm_eps=1e-5,
        max_seq_len=77,
        tie_embeddings=True,
        qk_norm=True,
        qk_norm_scope="all",
        qkv_bias=True,
        renormalize_top_k=False,
        shared_expert_gate=True,
        source_architecture="Qwen2MoeForCausalLM",
        layer_shapes=((6, 3, 40), (4, 2, 24), (2, 1, 8)),
    )


# -- round trips ------------------------------------------------------------------------------
def test_model_config_json_round_trip(rich_config, tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(rich_config.to_dict()))
    back = ModelConfig.from_dict(load_mapping(path))
    assert back == rich_config
    assert back.layer_shape(1) == (4, 2, 24)


def test_import_options_left_out_at_their_defaults():
    """Options added for imported architectures are written only when set: the config files of
    every model without them stay byte-identical to what older versions wrote."""
    from elasticmoe.config import IMPORT_OPTIONS

    plain = ModelConfig().to_dict()
    assert "dense_layers" in IMPORT_OPTIONS and "router_bias" in IMPORT_OPTIONS
    for name in IMPORT_OPTIONS:
        assert name not in plain
    assert ModelConfig(qkv_bias=True).to_dict()["qkv_bias"] is True
    assert ModelConfig.from_dict(plain) == ModelConfig()


def test_ernie_options_round_trip(tmp_path):
    """Dense layers, the router's selection bias and the renormalisation floor (ERNIE-4.5) survive
    YAML and JSON (a tuple of layer indices written as a list)."""
    config = ModelConfig(
        layers=4,
        dense_layers=(0, 3),
        dense_width=64,
        shared_expert_width=512,
        router_bias=True,
        renormalize_min=1e-12,
        source_architecture="Ernie4_5_MoeForCausalLM",
    )
    assert config.to_dict()["dense_layers"] == [0, 3] and config.is_dense(3) and not config.is_dense(1)
    (tmp_path / "m.yaml").write_text(dump_yaml(config.to_dict()))
    (tmp_path / "m.json").write_text(json.dumps(config.to_dict()))
    for name in ("m.yaml", "m.json"):
        assert ModelConfig.from_dict(load_mapping(tmp_path / name)) == config


def test_model_config_yaml_round_trip(rich_config, tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(dump_yaml(rich_config.to_dict()))
    back = ModelConfig.from_dict(load_mapping(path))
    assert back == rich_config
    assert isinstance(back.norm_eps, float) and isinstance(back.rope_theta, float)


def test_elastic_space_json_and_yaml_round_trip(tiny_config, tmp_path):
    space = ElasticSpace(depths=(3, 2), experts=(4, 2, 3), top_ks=(1, 2), widths=(24, 12, 6))
    space.validate(tiny_config)
    assert space.depths == (2, 3) and space.experts == (2, 3, 4)  # sorted on construction
    (tmp_path / "s.json").write_text(json.dumps(space.to_dict()))
    (tmp_path / "s.yaml").write_text(dump_yaml(space.to_dict()))
    for name in ("s.json", "s.yaml"):
        assert ElasticSpace.from_dict(load_mapping(tmp_path / name)) == space


def test_default_and_full_spaces_validate(tiny_config):
    ElasticSpace.full(tiny_config).validate(tiny_config)
    space = ElasticSpace.default_for(tiny_config)
    space.validate(tiny_config)
    assert max(space.depths) == tiny_config.layers and min(space.top_ks) == 1
    assert max(space.widths) == tiny_config.expert_width and min(space.widths) == tiny_config.expert_width // 4


def test_overrides_apply_to_a_copy():
    data = {"model": {"layers": 4}}
    out = apply_overrides(data, ["model.layers=2", "model.qk_norm=true", "space.depths=[1, 2]"])
    assert out == {"model": {"layers": 2, "qk_norm": True}, "space": {"depths": [1, 2]}}
    assert data == {"model": {"layers": 4}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(data, ["model.layers"])


# -- invalid values: each error names the field and what is allowed --------------------------
ONE_LAYER = {"layers": 1}
OUT = "is out of range; allowed"


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"top_k": 9, "experts": 8}, r"top_k=9 is out of range; allowed \[1, 8\]"),
        ({"layers": 0}, r"layers=0 is out of range; allowed >= 1"),
        ({"kv_heads": 8, "heads": 4}, r"kv_heads=8 is out of range; allowed \[1, 4\]"),
        ({"heads": 6, "kv_heads": 4}, r"heads=6 must be a multiple of kv_heads=4"),
        ({"head_dim": 7}, r"head_dim=7 must be even"),
        ({"d_model": "big"}, r"d_model='big' must be an integer"),
        ({"norm_eps": 2.0}, r"norm_eps=2.0 is out of range; allowed \(0, 1\)"),
        ({"qk_norm": "yes"}, r"qk_norm='yes' must be true or false"),
        ({"qk_norm_scope": "rows"}, r"qk_norm_scope='rows' must be one of \['head', 'all'\]"),
        ({"shared_expert_gate": True}, r"shared_expert_gate=true needs a shared expert"),
        ({"source_architecture": 3}, r"source_architecture=3 must be a string"),
        ({"dense_layers": [5], "dense_width": 8}, r"dense_layers has indices \[5\] outside \[0, 3\]"),
        ({"dense_layers": [1, 0], "dense_width": 8}, r"dense_layers=\[1, 0\] must be strictly increasing"),
        ({"dense_layers": [0]}, r"a dense width is given exactly when there are dense layers"),
        ({"dense_width": 8}, r"a dense width is given exactly when there are dense layers"),
        ({"renormalize_min": -1.0}, r"renormalize_min=-1.0 is out of range"),
        ({"router_bias": "yes"}, r"router_bias='yes' must be true or false"),
        ({"router_score": "relu"}, r"router_score='relu' must be one of \['softmax', 'sigmoid'\]"),
        ({"routed_scale": 0.0}, r"routed_scale=0.0 is out of range"),
        ({"rope_dims": 3}, r"rope_dims=3 must be even"),
        ({"rope_dims": 64}, r"rope_dims=64 is out of range; allowed \[0, 32\]"),
        ({"layers": 2, "layer_shapes": [[8, 2, 256]]}, r"layer_shapes has 1 entries; expected layers=2"),
        ({**ONE_LAYER, "layer_shapes": [[8, 2, 300]]}, rf"layer_shapes\[0\] width=300 {OUT} \[1, 256\]"),
        ({**ONE_LAYER, "layer_shapes": [[2, 3, 256]]}, r"layer_shapes\[0\] top_k=3 is out of range; allowed \[1, 2\]"),
        ({**ONE_LAYER, "layer_shapes": [[9, 1, 256]]}, rf"layer_shapes\[0\] experts=9 {OUT} \[1, 8\]"),
        ({**ONE_LAYER, "layer_shapes": [3]}, r"layer_shapes\[0\]=3 must be \[experts, top_k, width\]"),
    ],
)
def test_model_config_rejects_bad_values(changes, expected):
    with pytest.raises(ConfigError, match=expected):
        ModelConfig.from_dict(changes)


def test_model_config_unknown_field_is_named_with_allowed_set():
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({"d_modle": 64})
    msg = str(err.value)
    assert "unknown field(s) ['d_modle']" in msg and "'d_model'" in msg and "'expert_width'" in msg


def test_model_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({"layers": 0, "top_k": 12, "experts": 8, "head_dim": 5, "colour": "red"})
    msg = str(err.value)
    for part in ("layers=0", "top_k=12", "head_dim=5", "unknown field(s) ['colour']"):
        assert part in msg, (part, msg)


def test_model_config_rejects_non_mapping_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        ModelConfig.from_dict([1, 2])
    with pytest.raises(ConfigError, match="does not exist"):
        load_mapping(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_mapping(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_mapping(listy)


@pytest.mark.parametrize(
    "space, expected",
    [
        (dict(depths=[0, 2]), r"space.depths value=0 is out of range; allowed \[1, 3\]"),
        (dict(depths=[4]), r"space.depths value=4 is out of range; allowed \[1, 3\]"),
        (dict(experts=[5]), r"space.experts value=5 is out of range; allowed \[1, 4\]"),
        (dict(top_ks=[3]), r"space.top_ks value=3 is out of range; allowed \[1, 2\]"),
        (dict(widths=[48]), r"space.widths value=48 is out of range; allowed \[1, 24\]"),
        (dict(widths=[]), r"space.widths must be a non-empty list of integers in \[1, 24\]"),
        (dict(depths=[1, "a"]), r"space.depths value='a' must be an integer"),
        (dict(experts=[1], top_ks=[2]), r"space.top_ks minimum 2 exceeds space.experts minimum 1"),
    ],
)
def test_elastic_space_rejects_what_the_parent_cannot_provide(tiny_config, space, expected):
    base = dict(depths=[2, 3], experts=[2, 4], top_ks=[1, 2], widths=[12, 24])
    with pytest.raises(ConfigError, match=expected):
        ElasticSpace.from_dict({**base, **space}).validate(tiny_config)


def test_elastic_space_reports_every_problem_and_unknown_fields(tiny_config):
    with pytest.raises(ConfigError) as err:
        ElasticSpace.from_dict(dict(depths=[0], experts=[9], top_ks=[1], widths=[25])).validate(tiny_config)
    msg = str(err.value)
    assert "space.depths value=0" in msg and "space.experts value=9" in msg and "space.widths value=25" in msg
    with pytest.raises(ConfigError, match=r"space: unknown field\(s\) \['width'\]"):
        ElasticSpace.from_dict({"width": [8]})
