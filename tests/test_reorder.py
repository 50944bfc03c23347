"""Importance re-ordering is an exact permutation of the parameters and the optimizer state."""

from __future__ import annotations

import copy

import pytest
import torch

from elasticmoe.config import ModelConfig
from elasticmoe.model import ElasticMoE
from elasticmoe.reorder import measure_importance, permute_experts, permute_neurons, reorder
from elasticmoe.subnet import Subnet


def _setup(shared=0):
    torch.manual_seed(0)
    c = ModelConfig(
        vocab_size=61,
        d_model=32,
        layers=3,
        heads=4,
        kv_heads=2,
        head_dim=8,
        experts=5,
        top_k=2,
        expert_width=12,
        max_seq_len=32,
        shared_expert_width=shared,
    )
    model = ElasticMoE(c)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    tokens = torch.randint(0, 61, (3, 20))
    for _ in range(2):  # populate Adam moments
        model(tokens).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, tokens


def _step(model, opt, tokens):
    out = model(tokens)
    (out.logits.square().mean() + out.aux_loss).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("experts_by", ["mass", "output"])
def test_reorder_preserves_full_model_and_next_optimizer_step(experts_by):
    model, opt, tokens = _setup(shared=8)
    ref_model, ref_opt = copy.deepcopy(model), None
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors otherwise
    before = model(tokens).logits
    summary = reorder(model, [tokens], opt, experts_by=experts_by)
    assert any(p != sorted(p) for p in summary["expert_perms"])  # something really moved
    after = model(tokens).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    # one more identical step on both: the permuted model equals the permuted reference
    _step(model, opt, tokens)
    _step(ref_model, ref_opt, tokens)
    torch.testing.assert_close(model(tokens).logits, ref_model(tokens).logits, atol=1e-5, rtol=0)
    # and parameters match exactly up to the recorded expert permutation (+ neuron permutation)
    for i, perm in enumerate(summary["expert_perms"]):
        got, ref = model.blocks[i].moe.router.weight, ref_model.blocks[i].moe.router.weight[perm]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)  # float reduction order differs
        g = model.blocks[i].moe.w_gate.norm(dim=-1).sort(dim=1).values
        r = ref_model.blocks[i].moe.w_gate[perm].norm(dim=-1).sort(dim=1).values
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0)


def test_permutations_move_optimizer_state_with_parameters():
    model, opt, _ = _setup()
    m = model.blocks[1].moe
    perm = torch.tensor([4, 2, 0, 1, 3])
    w_before = m.w_up.detach().clone()
    exp_avg_before = opt.state[m.w_up]["exp_avg"].clone()
    permute_experts(model, 1, perm, opt)
    assert torch.equal(m.w_up, w_before[perm])
    assert torch.equal(opt.state[m.w_up]["exp_avg"], exp_avg_before[perm])
    perm_EW = torch.stack([torch.randperm(12) for _ in range(5)])
    down_before, sq_before = m.w_down.detach().clone(), opt.state[m.w_down]["exp_avg_sq"].clone()
    permute_neurons(model, 1, perm_EW, opt)
    for e in range(5):
        assert torch.equal(m.w_down[e], down_before[e][:, perm_EW[e]])
        assert torch.equal(opt.state[m.w_down]["exp_avg_sq"][e], sq_before[e][:, perm_EW[e]])


def test_reorder_puts_most_used_experts_first_and_sets_layer_order():
    model, opt, tokens = _setup()
    reorder(model, [tokens], opt, experts_by="mass")
    scores = measure_importance(model, [tokens], "mass")
    for s in scores["experts"]:
        assert torch.all(s[:-1] >= s[1:] - 1e-6)  # descending after re-ordering
    assert sorted(model.layer_order) == [0, 1, 2]
    expected = torch.argsort(scores["layers"], descending=True, stable=True).tolist()
    assert model.layer_order == expected
    # `L2` now keeps the two most important layers
    sn = Subnet.parse("L2 E3 k1 W6", model.config, model.layer_order)
    assert set(sn.layers) == set(model.layer_order[:2])
