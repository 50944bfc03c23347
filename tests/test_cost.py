"""The analytic cost model against what a sub-network really touches and really computes."""

from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from elasticmoe.config import ModelConfig
from elasticmoe.cost import child_config, cost, layer_flops, memory_bytes
from elasticmoe.model import ElasticMoE, rope_cos_sin
from elasticmoe.subnet import LayerSpec, Subnet

VARIANTS = {
    "plain": {},
    "shared+qknorm": {"shared_expert_width": 16, "qk_norm": True},
    "tied": {"tie_embeddings": True},
    "olmoe": {"qk_norm": True, "qk_norm_scope": "all", "renormalize_top_k": False},
    "qwen2_moe": {"shared_expert_width": 16, "shared_expert_gate": True, "qkv_bias": True, "renormalize_top_k": False},
    # a dense layer 0 (kept whole: its spec does not apply), shared experts, a selection bias (not a parameter)
    "ernie": {
        "dense_layers": (0,),
        "dense_width": 20,
        "shared_expert_width": 16,
        "router_bias": True,
        "renormalize_min": 1e-12,
    },
    # the same with a sigmoid router and partial RoPE (neither changes a count), q/k norm and biases
    "glm": {
        "dense_layers": (0,),
        "dense_width": 20,
        "shared_expert_width": 16,
        "router_bias": True,
        "router_score": "sigmoid",
        "routed_scale": 2.5,
        "rope_dims": 4,
        "qk_norm": True,
        "qkv_bias": True,
    },
}
SUBNETS = {
    "uniform": Subnet.uniform((0, 2), 2, 1, 12),
    "per-layer": Subnet((0, 1, 2), (LayerSpec(4, 2, 24), LayerSpec(3, 3, 8), LayerSpec(1, 1, 16))),
}


def _model(config: ModelConfig) -> ElasticMoE:
    torch.manual_seed(0)
    return ElasticMoE(config).eval()


def touched_params(model: ElasticMoE, subnet: Subnet) -> tuple[int, int]:
    """(total, active) numel of the tensor slices `subnet` reads, summed by hand from the modules."""
    total = model.embed.weight.numel() + model.norm.weight.numel()
    if model.lm_head is not None:
        total += model.lm_head.weight.numel()
    inactive = 0
    for i, s in zip(subnet.layers, subnet.specs):
        block = model.blocks[i]
        total += sum(p.numel() for p in block.attn.parameters())  # q, k, v, o (+ q/k norms)
        total += block.attn_norm.weight.numel() + block.moe_norm.weight.numel()
        if block.mlp is not None:  # a dense layer: its MLP whole, every weight active
            total += sum(p.numel() for p in block.mlp.parameters())
            continue
        moe = block.moe
        total += moe.router.weight[: s.experts].numel()
        one_expert = (
            moe.w_gate[0, : s.width].numel() + moe.w_up[0, : s.width].numel() + moe.w_down[0, :, : s.width].numel()
        )
        kept = (
            moe.w_gate[: s.experts, : s.width].numel()
            + moe.w_up[: s.experts, : s.width].numel()
            + moe.w_down[: s.experts, :, : s.width].numel()
        )
        assert kept == s.experts * one_expert
        total += kept
        if moe.shared is not None:
            total += sum(p.numel() for p in moe.shared.parameters())
        if moe.shared_gate is not None:
            total += moe.shared_gate.weight.numel()
        inactive += (s.experts - s.top_k) * one_expert
    return total, total - inactive


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("which", ["full", *SUBNETS])
def test_params_equal_the_slices_a_subnet_touches(tiny_config, variant, which):
    config = replace(tiny_config, **VARIANTS[variant])
    model = _model(config)
    subnet = Subnet.full(config) if which == "full" else SUBNETS[which]
    c = cost(config, subnet)
    assert (c.total_params, c.active_params) == touched_params(model, subnet)
    if which == "full":
        assert c.total_params == model.num_params()
    # A standalone child built from the cost model's own child_config holds exactly that many weights.
    assert ElasticMoE(child_config(config, subnet)).num_params() == c.total_params


def test_active_params_match_the_experts_one_token_uses(tiny_config):
    """Backward from a single token: exactly top_k kept experts per layer receive gradient."""
    model = _model(tiny_config)
    subnet = Subnet((0, 1, 2), (LayerSpec(4, 2, 24), LayerSpec(3, 3, 8), LayerSpec(2, 1, 16)))
    model(torch.tensor([[5]]), subnet).logits.sum().backward()
    for i, s in zip(subnet.layers, subnet.specs):
        grad = model.blocks[i].moe.w_gate.grad
        used = [e for e in range(grad.shape[0]) if grad[e].abs().sum() > 0]
        assert len(used) == s.top_k and max(used) < s.experts
    total, active = touched_params(model, subnet)
    assert cost(tiny_config, subnet).active_params == active < total


@pytest.mark.parametrize("variant", VARIANTS)
def test_flop_counter_matches_cost_model(tiny_config, variant):
    """FlopCounterMode counts the matmuls really run; the sub-network must count as the sub-network.

    SDPA is forced to the MATH backend: FlopCounterMode has no formula for the fused CPU kernel
    (it counts 0 there), while on the math path it counts QK^T and AV as the cost model does.
    """
    config = replace(tiny_config, **VARIANTS[variant])
    model = _model(config)
    B, T = 2, 16
    tokens = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    counted = {}
    for name, subnet in [("parent", None), *SUBNETS.items()]:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(tokens, subnet)
        counted[name] = counter.get_total_flops()
        expected = cost(config, subnet, seq_len=T).flops_forward * B * T
        assert abs(counted[name] - expected) <= 0.05 * expected, (name, counted[name], expected)
    for name in SUBNETS:
        assert counted[name] < 0.9 * counted["parent"]


@pytest.mark.parametrize("spec", [LayerSpec(4, 2, 24), LayerSpec(2, 1, 12), LayerSpec(3, 3, 5)], ids=str)
def test_one_block_counts_exactly_the_kept_matmuls(tiny_config, spec):
    """Per block the count is exact: scoring dropped experts (and slicing after) or running dropped
    neurons would add FLOPs that the 5% whole-model tolerance above could hide."""
    config = replace(tiny_config, shared_expert_width=8)
    model = _model(config)
    B, T = 2, 16
    x = torch.randn(B, T, config.d_model)
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(T), x.dtype)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.blocks[1](x, cos, sin, spec)
    assert counter.get_total_flops() == layer_flops(config, spec.experts, spec.top_k, spec.width, T) * B * T


def test_a_dense_block_counts_its_whole_mlp(tiny_config):
    """A dense layer (ERNIE-4.5's leading layers) costs its attention and its whole MLP whatever the
    spec asks; dropping it by depth removes exactly that."""
    from elasticmoe.cost import dense_layer_flops, dense_layer_params

    config = replace(tiny_config, dense_layers=(0,), dense_width=20)
    model = _model(config)
    B, T = 2, 16
    x = torch.randn(B, T, config.d_model)
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(T), x.dtype)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.blocks[0](x, cos, sin, LayerSpec(1, 1, 4))
    assert counter.get_total_flops() == dense_layer_flops(config, T) * B * T
    assert dense_layer_params(config) == sum(p.numel() for p in model.blocks[0].parameters())
    kept, dropped = cost(config, Subnet.uniform((0, 1), 2, 1, 8)), cost(config, Subnet.uniform((1,), 2, 1, 8))
    assert kept.total_params - dropped.total_params == dense_layer_params(config)
    assert kept.active_params - dropped.active_params == dense_layer_params(config)


def test_flops_and_memory_grow_with_the_subnet(tiny_config):
    small, big = Subnet.uniform((0,), 1, 1, 8), Subnet.full(tiny_config)
    c_small, c_big = cost(tiny_config, small, 32), cost(tiny_config, big, 32)
    assert c_small.flops_forward < c_big.flops_forward
    assert c_big.flops_train == 3 * c_big.flops_forward
    assert cost(tiny_config, big, 64).flops_forward > c_big.flops_forward  # attention grows with context
    kv = 2 * tiny_config.layers * tiny_config.kv_heads * tiny_config.head_dim * 32 * 2 * 4
    assert memory_bytes(tiny_config, big, seq_len=32, batch=2) == 4 * c_big.total_params + kv
