"""Extraction: the child reproduces the parent's sub-network exactly, costs what the cost model says,
and stands alone."""

from dataclasses import replace

import pytest
import torch

from elasticmoe import checkpoint
from elasticmoe.config import ConfigError
from elasticmoe.cost import cost
from elasticmoe.extract import ExtractionError, child_layer_order, extract, extract_to_folder, verify
from elasticmoe.model import ElasticMoE
from elasticmoe.subnet import LayerSpec, Subnet


def make_parent(config, seed=0) -> ElasticMoE:
    torch.manual_seed(seed)
    model = ElasticMoE(config)
    with torch.no_grad():  # norms away from 1 so a wrongly copied norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    model.layer_order = [2, 0, 1]
    return model


SUBNETS = {
    "uniform": Subnet.uniform([0, 1, 2], 3, 2, 16),
    "dropped": Subnet.uniform([0, 2], 2, 1, 8),
    "per_layer": Subnet((1, 2), (LayerSpec(2, 1, 8), LayerSpec(4, 2, 24))),
    "one_layer": Subnet.uniform([1], 4, 2, 24),
}


@pytest.mark.parametrize("shared", [0, 16])
@pytest.mark.parametrize("name", sorted(SUBNETS))
def test_child_logits_equal_parent_subnet(tiny_config, shared, name):
    config = replace(tiny_config, shared_expert_width=shared, qk_norm=shared > 0)
    parent = make_parent(config)
    subnet = SUBNETS[name]
    child = extract(parent, subnet)
    tokens = torch.randint(0, config.vocab_size, (2, 24))
    assert verify(parent, subnet, child, tokens) <= 1e-5
    assert child.num_params() == cost(config, subnet).total_params
    assert child.config.layers == subnet.depth
    if not subnet.is_uniform:
        assert child.config.layer_shapes == tuple((s.experts, s.top_k, s.width) for s in subnet.specs)
    for p in child.parameters():  # standalone copies, not views of the parent
        assert p.is_contiguous()
        assert all(p.data_ptr() != q.data_ptr() for q in parent.parameters())


def test_full_subnet_child_equals_parent(tiny_config):
    parent = make_parent(replace(tiny_config, tie_embeddings=True))
    child = extract(parent, Subnet.full(parent.config))
    assert child.config == parent.config
    assert child.layer_order == parent.layer_order
    ours, theirs = parent.state_dict(), child.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 16))
    assert torch.equal(parent(tokens).logits, child(tokens).logits)


def test_layer_order_restricted_and_renumbered():
    assert child_layer_order([2, 0, 1], (0, 2)) == [1, 0]
    assert child_layer_order([3, 1, 0, 2], (1, 2, 3)) == [2, 0, 1]


def test_extract_to_folder_writes_verified_child(tiny_config, tmp_path):
    # Wide enough that the safetensors header (~2 kB) is well under 1% of the tensor bytes.
    tiny_config = replace(tiny_config, d_model=64, expert_width=128, vocab_size=512)
    parent = make_parent(tiny_config)
    subnet = SUBNETS["dropped"]
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 32))
    tok_file = tmp_path / "tok.json"
    tok_file.write_text('{"model": {"vocab": {}}}')
    out = tmp_path / "child"
    meta = extract_to_folder(
        parent, subnet, out, tokens, tokenizer_path=tok_file, parent_meta={"path": "runs/x/parent"}
    )
    expected = cost(tiny_config, subnet)
    assert meta["params"] == expected.total_params and meta["active_params"] == expected.active_params
    assert meta["subnet"] == str(subnet) and Subnet.from_dict(meta["subnet_json"]) == subnet
    assert meta["verification"]["tokens_verified"] == 64
    assert meta["verification"]["max_abs_logit_diff"] <= 1e-4
    assert meta["parent"]["path"] == "runs/x/parent"
    assert (out / "tokenizer.json").read_text() == tok_file.read_text()
    size = (out / "model.safetensors").stat().st_size
    assert abs(size - 4 * expected.total_params) <= 0.01 * 4 * expected.total_params
    expected_logits = parent(tokens, subnet).logits

    del parent  # loading needs nothing of the parent
    child, loaded_meta = checkpoint.load_model(out)
    assert loaded_meta == meta
    assert child.layer_order == [1, 0]
    assert child.num_params() == expected.total_params
    assert (child(tokens).logits - expected_logits).abs().max() <= 1e-5


def test_parent_identity_from_checkpoint_manifest(tiny_config, tmp_path):
    parent = make_parent(tiny_config)
    checkpoint.save_model(tmp_path / "parent", parent)
    tokens = torch.randint(0, tiny_config.vocab_size, (1, 8))
    meta = extract_to_folder(
        parent, SUBNETS["uniform"], tmp_path / "c", tokens, parent_meta={"path": tmp_path / "parent"}
    )
    manifest = checkpoint.read_json(tmp_path / "parent" / "manifest.json")
    assert meta["parent"]["model_sha256"] == manifest["files"]["model.safetensors"]["sha256"]


def test_failed_verification_leaves_nothing(tiny_config, tmp_path):
    parent = make_parent(tiny_config)
    tokens = torch.randint(0, tiny_config.vocab_size, (1, 8))
    out = tmp_path / "runs" / "child"
    with pytest.raises(ExtractionError, match="failed verification") as err:
        extract_to_folder(parent, SUBNETS["uniform"], out, tokens, tolerance=-1)
    assert isinstance(err.value, ConfigError)
    assert not out.exists()
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_failed_verification_keeps_existing_folder(tiny_config, tmp_path, monkeypatch):
    parent = make_parent(tiny_config)
    tokens = torch.randint(0, tiny_config.vocab_size, (1, 8))
    out = tmp_path / "child"
    extract_to_folder(parent, SUBNETS["uniform"], out, tokens)
    before = (out / "manifest.json").read_text()
    import elasticmoe.extract as ex

    monkeypatch.setattr(ex, "verify", lambda *a: float("nan"))
    with pytest.raises(ExtractionError):
        extract_to_folder(parent, SUBNETS["dropped"], out, tokens)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child"]


def test_invalid_subnet_refused(tiny_config, tmp_path):
    parent = make_parent(tiny_config)
    with pytest.raises(ConfigError, match="experts=9"):
        extract(parent, Subnet.uniform([0], 9, 2, 8))
