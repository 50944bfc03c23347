"""The elastic model: sub-networks equal standalone models, dispatch equals a naive loop,
dropped parts get no gradient, KV-cached decoding equals naive decoding, checkpoints round-trip."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from elasticmoe.checkpoint import CheckpointError, load_model, save_model
from elasticmoe.config import ModelConfig
from elasticmoe.model import ElasticMoE, MoE, moe_dispatch
from elasticmoe.subnet import LayerSpec, Subnet

HAS_GROUPED = hasattr(torch, "_grouped_mm")
METHODS = ["loop", pytest.param("grouped", marks=pytest.mark.skipif(not HAS_GROUPED, reason="no torch._grouped_mm"))]
VARIANTS = {
    "plain": {},
    "shared": {"shared_expert_width": 16},
    "qk_norm": {"qk_norm": True},
    "tied": {"tie_embeddings": True},
    "all": {"shared_expert_width": 8, "qk_norm": True, "tie_embeddings": True},
    "olmoe": {"qk_norm": True, "qk_norm_scope": "all", "renormalize_top_k": False},
    "qwen2_moe": {"shared_expert_width": 8, "shared_expert_gate": True, "qkv_bias": True, "renormalize_top_k": False},
    # dense layer 0 (kept whole), ungated shared experts, a selection bias, a floored renormalisation
    "ernie": {
        "dense_layers": (0,),
        "dense_width": 20,
        "shared_expert_width": 16,
        "router_bias": True,
        "renormalize_min": 1e-12,
    },
    # the same layout with a sigmoid router, scaled weights, partial RoPE, per-head q/k norm, q/k/v biases
    "glm": {
        "dense_layers": (0,),
        "dense_width": 20,
        "shared_expert_width": 16,
        "router_bias": True,
        "router_score": "sigmoid",
        "routed_scale": 2.5,
        "renormalize_eps": 1e-20,
        "rope_dims": 4,
        "qk_norm": True,
        "qkv_bias": True,
    },
}


def make_model(config: ModelConfig, seed: int = 0, std: float = 0.1) -> ElasticMoE:
    """Weights larger than the training init, so that every part visibly moves the logits."""
    torch.manual_seed(seed)
    model = ElasticMoE(config)
    model.init_weights(std)
    with torch.no_grad():  # norms away from 1, so a wrongly copied norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("router_bias"):  # a selection bias that changes which experts are chosen
                b.normal_(0.0, 0.3)
    return model.eval()


def tokens(config: ModelConfig, B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# -- full sub-network ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_full_subnet_is_bitwise_the_parent(tiny_config, variant):
    config = replace(tiny_config, **VARIANTS[variant])
    model, x = make_model(config), tokens(config)
    a, b = model(x), model(x, Subnet.full(config))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.aux_loss, b.aux_loss)


# -- sub-network == standalone model with the kept weights copied in by hand -------------------
def _put(dst: torch.Tensor, src: torch.Tensor) -> int:
    assert dst.shape == src.shape, (dst.shape, src.shape)  # copy_ would broadcast a wrong shape
    dst.copy_(src)
    return dst.numel()


@torch.no_grad()
def copy_kept_weights(parent: ElasticMoE, child: ElasticMoE, subnet: Subnet) -> None:
    n = _put(child.embed.weight, parent.embed.weight) + _put(child.norm.weight, parent.norm.weight)
    if parent.lm_head is not None:
        n += _put(child.lm_head.weight, parent.lm_head.weight)
    for slot, (i, s) in enumerate(zip(subnet.layers, subnet.specs)):
        src, dst = parent.blocks[i], child.blocks[slot]
        for a, b in zip(dst.attn.parameters(), src.attn.parameters()):
            n += _put(a, b)
        n += _put(dst.attn_norm.weight, src.attn_norm.weight) + _put(dst.moe_norm.weight, src.moe_norm.weight)
        if src.mlp is not None:  # a dense layer, whole
            n += sum(_put(a, b) for a, b in zip(dst.mlp.parameters(), src.mlp.parameters()))
            continue
        E, W = s.experts, s.width
        if src.moe.router_bias is not None:
            _put(dst.moe.router_bias, src.moe.router_bias[:E])  # a buffer, not a parameter
        n += _put(dst.moe.router.weight, src.moe.router.weight[:E])
        n += _put(dst.moe.w_gate, src.moe.w_gate[:E, :W]) + _put(dst.moe.w_up, src.moe.w_up[:E, :W])
        n += _put(dst.moe.w_down, src.moe.w_down[:E, :, :W])
        if src.moe.shared is not None:
            for a, b in zip(dst.moe.shared.parameters(), src.moe.shared.parameters()):
                n += _put(a, b)
        if src.moe.shared_gate is not None:
            n += _put(dst.moe.shared_gate.weight, src.moe.shared_gate.weight)
    assert n == child.num_params()  # every child weight was written: none left at its random init


def standalone_config(parent: ModelConfig, subnet: Subnet) -> ModelConfig:
    """The child's shape, written out by hand (deliberately not cost.child_config)."""
    dense = tuple(n for n, i in enumerate(subnet.layers) if i in parent.dense_layers)
    parent = replace(parent, layers=subnet.depth, dense_layers=dense, dense_width=parent.dense_width if dense else 0)
    if subnet.is_uniform:
        s = subnet.specs[0]
        return replace(parent, experts=s.experts, top_k=s.top_k, expert_width=s.width)
    shapes = tuple((s.experts, s.top_k, s.width) for s in subnet.specs)
    return replace(
        parent,
        experts=max(e for e, _, _ in shapes),
        top_k=max(k for _, k, _ in shapes),
        expert_width=max(w for _, _, w in shapes),
        layer_shapes=shapes,
    )


SUBNETS = {
    "uniform-drop-middle": Subnet.uniform((0, 2), 2, 1, 12),
    "uniform-drop-first-k=E": Subnet.uniform((1, 2), 3, 3, 8),
    "uniform-one-layer": Subnet.uniform((1,), 4, 2, 5),
    "per-layer": Subnet((0, 1, 2), (LayerSpec(4, 2, 24), LayerSpec(3, 3, 8), LayerSpec(1, 1, 16))),
    "per-layer-drop": Subnet((0, 2), (LayerSpec(2, 2, 20), LayerSpec(3, 1, 4))),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("which", SUBNETS)
def test_subnet_equals_standalone_model(tiny_config, variant, which):
    config = replace(tiny_config, **VARIANTS[variant])
    subnet = SUBNETS[which]
    parent = make_model(config)
    child_cfg = standalone_config(config, subnet)
    assert bool(child_cfg.layer_shapes) == (not subnet.is_uniform)
    child = ElasticMoE(child_cfg).eval()
    copy_kept_weights(parent, child, subnet)
    x = tokens(config)
    with torch.no_grad():
        ours, ref, full = parent(x, subnet), child(x), parent(x)
    assert (ours.logits - ref.logits).abs().max().item() <= 1e-5
    assert torch.allclose(ours.aux_loss, ref.aux_loss, atol=1e-6) and torch.allclose(ours.z_loss, ref.z_loss, atol=1e-6)
    assert (ours.logits - full.logits).abs().max().item() > 1e-2  # the dropped parts did matter


# -- dispatch against a naive per-token loop ------------------------------------------------------
def naive_moe(x_ND, weights_NK, experts_NK, w_gate, w_up, w_down):
    y = [torch.zeros_like(x_ND[0]) for _ in range(x_ND.shape[0])]
    for n in range(x_ND.shape[0]):
        for k in range(experts_NK.shape[1]):
            e = int(experts_NK[n, k])
            h = F.silu(w_gate[e] @ x_ND[n]) * (w_up[e] @ x_ND[n])
            y[n] = y[n] + weights_NK[n, k] * (w_down[e] @ h)
    return torch.stack(y)


def _route(scores_NE: torch.Tensor, K: int):
    top_p, top_i = scores_NE.softmax(-1).topk(K, dim=-1)
    return top_p / top_p.sum(-1, keepdim=True), top_i


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "E, K, W, dead",
    [
        (4, 2, 24, None),  # all experts used, full width
        (4, 2, 12, 0),  # first expert receives no tokens, width prefix
        (4, 2, 12, 1),  # a middle expert receives no tokens
        (3, 1, 8, 2),  # the last kept expert receives no tokens
        (3, 3, 16, None),  # top-k = experts kept
        (4, 2, 5, 3),  # width not 16-byte aligned: grouped falls back to the loop
    ],
)
def test_dispatch_equals_naive_loop(method, E, K, W, dead):
    g = torch.Generator().manual_seed(E * 100 + K * 10 + W)
    N, D, E_all, W_all = 24, 32, 5, 24
    x = torch.randn(N, D, generator=g, requires_grad=True)
    params = [torch.randn(E_all, W_all, D, generator=g) * 0.3 for _ in range(2)]
    params.append(torch.randn(E_all, D, W_all, generator=g) * 0.3)
    params = [p.requires_grad_() for p in params]
    scores = torch.randn(N, E, generator=g)
    if dead is not None:
        scores[:, dead] = float("-inf")
    weights, experts = _route(scores, K)
    counts = torch.bincount(experts.reshape(-1), minlength=E)
    assert (counts == 0).sum().item() == (dead is not None)
    w_gate, w_up, w_down = params[0][:E, :W], params[1][:E, :W], params[2][:E, :, :W]  # views, as in the model

    y = moe_dispatch(x, weights, experts, w_gate, w_up, w_down, method)
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, D)).sum(), [x, *params])
    y_ref = naive_moe(x, weights, experts, w_gate, w_up, w_down)
    grads_ref = torch.autograd.grad((y_ref * torch.linspace(-1, 1, D)).sum(), [x, *params])

    assert torch.isfinite(y).all() and all(torch.isfinite(gr).all() for gr in grads)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    for gr, gr_ref in zip(grads, grads_ref):
        assert torch.allclose(gr, gr_ref, atol=1e-4, rtol=1e-4)
    for gr in grads[1:]:
        if dead is not None:  # an expert with no tokens gets exactly zero, not garbage from empty groups
            assert torch.count_nonzero(gr[dead]) == 0
        assert torch.count_nonzero(gr[E:]) == 0  # experts past the kept prefix
    assert torch.count_nonzero(grads[1][:, W:]) == 0 and torch.count_nonzero(grads[3][:, :, W:]) == 0


@pytest.mark.parametrize("method", METHODS)
def test_moe_module_with_an_expert_the_router_never_picks(method):
    """Router weights force expert 1 out: its row scores -10 * sum(x) on all-positive inputs."""
    torch.manual_seed(0)
    moe = MoE(d_model=16, experts=4, width=8, shared_width=0)
    for p in (moe.w_gate, moe.w_up, moe.w_down):
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        moe.router.weight.normal_(std=0.1)
        moe.router.weight[1] = -10.0
    x = torch.rand(40, 16) + 0.1
    spec = LayerSpec(4, 2, 8)
    y, aux, z = moe(x, spec, method)
    (y.square().sum() + aux + z).backward()
    probs = (x @ moe.router.weight.T).softmax(-1)
    weights, experts = _route(x @ moe.router.weight.T, 2)
    assert not (experts == 1).any() and probs[:, 1].max() < 1e-6
    with torch.no_grad():
        assert torch.allclose(y, naive_moe(x, weights, experts, moe.w_gate, moe.w_up, moe.w_down), atol=1e-5)
    for p in (moe.w_gate, moe.w_up, moe.w_down):
        assert torch.isfinite(p.grad).all()
        assert torch.count_nonzero(p.grad[1]) == 0
        assert all(torch.count_nonzero(p.grad[e]) > 0 for e in (0, 2, 3))


# -- gradients reach exactly the kept parts ---------------------------------------------------------
def _nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and torch.count_nonzero(t).item() > 0


def _zero(t: torch.Tensor | None) -> bool:
    return t is None or torch.count_nonzero(t).item() == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "subnet",
    [Subnet.uniform((0, 2), 2, 1, 12), Subnet((1, 2), (LayerSpec(3, 2, 8), LayerSpec(1, 1, 20)))],
    ids=["uniform", "per-layer"],
)
@pytest.mark.parametrize("variant", ["qk_norm", "olmoe", "qwen2_moe"])
def test_backward_touches_only_kept_parts(tiny_config, method, subnet, variant):
    config = replace(tiny_config, **{"shared_expert_width": 8, **VARIANTS[variant]})
    model = make_model(config).train()
    x = tokens(config, B=4, T=16)
    out = model(x[:, :-1], subnet, dispatch=method)
    loss = F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten()) + out.aux_loss + out.z_loss
    loss.backward()

    assert all(_nonzero(p.grad) for p in (model.embed.weight, model.lm_head.weight, model.norm.weight))
    for i, block in enumerate(model.blocks):
        if i not in subnet.layers:
            assert all(p.grad is None for p in block.parameters()), f"dropped layer {i} got a gradient"
            continue
        s = subnet.spec_for(i)
        E, W = s.experts, s.width
        moe = block.moe
        assert all(_nonzero(p.grad) for p in block.attn.parameters())
        assert all(_nonzero(p.grad) for p in moe.shared.parameters())  # kept whole, gate included
        assert moe.shared_gate is None or _nonzero(moe.shared_gate.weight.grad)
        assert _zero(moe.router.weight.grad[E:]) and all(_nonzero(moe.router.weight.grad[e]) for e in range(E))
        for p in (moe.w_gate, moe.w_up):
            assert _zero(p.grad[E:]) and _zero(p.grad[:, W:])  # dropped experts, dropped neurons
            assert all(_nonzero(p.grad[e, w]) for e in range(E) for w in range(W))  # every kept neuron
        assert _zero(moe.w_down.grad[E:]) and _zero(moe.w_down.grad[:, :, W:])
        assert all(_nonzero(moe.w_down.grad[e, :, w]) for e in range(E) for w in range(W))


# -- KV-cached decoding --------------------------------------------------------------------------
def naive_greedy(model: ElasticMoE, prompt: torch.Tensor, steps: int, subnet: Subnet | None) -> torch.Tensor:
    out = prompt
    for _ in range(steps):
        nxt = model(out, subnet).logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
    return out


@pytest.mark.parametrize("subnet", [None, Subnet.uniform((0, 2), 2, 1, 12)], ids=["parent", "subnet"])
def test_cached_greedy_generate_equals_naive_decoding(tiny_config, subnet):
    config = replace(tiny_config, qk_norm=True)
    model = make_model(config, std=0.3)
    prompt = tokens(config, B=2, T=5)
    with torch.no_grad():
        expected = naive_greedy(model, prompt, 12, subnet)
        got = model.generate(prompt, 12, subnet)
    assert got.shape == (2, 17)
    assert torch.equal(got, expected)
    assert len(set(got[0, 5:].tolist())) > 1  # not a degenerate constant continuation


@pytest.mark.parametrize(
    "subnet", [None, Subnet((1, 2), (LayerSpec(3, 2, 8), LayerSpec(2, 1, 24)))], ids=["parent", "subnet"]
)
def test_chunked_prefill_with_cache_equals_one_shot(tiny_config, subnet):
    model = make_model(tiny_config)
    x = tokens(tiny_config, B=2, T=14)
    with torch.no_grad():
        one_shot = model(x, subnet).logits
        cache = model.new_cache(2, 14, subnet)
        assert len(cache.k) == (subnet.depth if subnet else tiny_config.layers)
        first = model(x[:, :6], subnet, cache).logits
        second = model(x[:, 6:], subnet, cache).logits
    assert cache.length == 14
    assert torch.allclose(torch.cat([first, second], dim=1), one_shot, atol=1e-5, rtol=0)


# -- document masking (packed rows) ---------------------------------------------------------------
@pytest.mark.parametrize(
    "subnet", [None, Subnet((1, 2), (LayerSpec(3, 2, 8), LayerSpec(2, 1, 24)))], ids=["parent", "subnet"]
)
def test_document_mask_gives_each_packed_document_its_own_logits(tiny_config, subnet):
    """A row packing [EOS]+doc three times, masked by documents, gives every document the logits
    it gets alone (RoPE is relative: the shift of positions does not matter); unmasked it does not."""
    model = make_model(tiny_config)
    eos = 0
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, tiny_config.vocab_size, (n,), generator=g) for n in (5, 3, 7)]
    row = torch.cat([torch.cat([torch.tensor([eos]), d]) for d in docs])[None]
    with torch.no_grad():
        masked = model(row, subnet, doc_eos=eos).logits[0]
        plain = model(row, subnet).logits[0]
        start = 0
        for d in docs:
            alone = model(torch.cat([torch.tensor([eos]), d])[None], subnet).logits[0]
            got = masked[start : start + len(d) + 1]
            assert torch.allclose(got, alone, atol=1e-5, rtol=0)
            if start:  # a later document sees the earlier ones without the mask
                assert not torch.allclose(plain[start : start + len(d) + 1], alone, atol=1e-3, rtol=0)
            start += len(d) + 1
        one = row[:, :6]  # one document: the mask is plain causal attention
        assert torch.allclose(model(one, subnet, doc_eos=eos).logits, model(one, subnet).logits, atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match="KV cache"):
            model(row, subnet, model.new_cache(1, row.shape[1], subnet), doc_eos=eos)


# -- checkpoints ---------------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_logits(tiny_config, tmp_path):
    config = replace(tiny_config, shared_expert_width=8, qk_norm=True)
    model = make_model(config)
    model.layer_order = [2, 0, 1]
    save_model(tmp_path / "m", model, meta={"step": 3})
    loaded, meta = load_model(tmp_path / "m")
    assert meta == {"step": 3} and loaded.config == config and loaded.layer_order == [2, 0, 1]
    x = tokens(config)
    subnet = Subnet.uniform((0, 2), 2, 1, 12)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, model(x).logits)
        assert torch.equal(loaded(x, subnet).logits, model(x, subnet).logits)


def test_flipped_byte_in_weights_is_caught(tiny_config, tmp_path):
    save_model(tmp_path / "m", make_model(tiny_config))
    path = tmp_path / "m" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the tensor payload: the file still parses, only the checksum knows
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("method", ["loop", "grouped"])
def test_bf16_autocast_runs_forward_and_backward_with_either_dispatch(method):
    """What training does on a GPU (bf16 autocast), checked on the CPU: the experts' bf16 output
    must be scattered into the float32 residual stream, and grads must come back finite."""
    c = ModelConfig(
        vocab_size=97,
        d_model=32,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=8,
        experts=4,
        top_k=2,
        expert_width=24,
        max_seq_len=32,
    )
    torch.manual_seed(0)
    model = ElasticMoE(c)
    tokens = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, Subnet.parse("L2 E3 k2 W16", c), dispatch=method)
    ref = model(tokens, Subnet.parse("L2 E3 k2 W16", c), dispatch=method).logits
    out.logits.float().square().mean().backward()
    assert out.logits.dtype == torch.bfloat16
    assert (out.logits.float() - ref).abs().max() < 0.1  # bf16 rounding, not a different function
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_router_learns_from_the_language_model_loss_at_every_top_k(tiny_config, top_k, renormalize):
    """The router's gradient from the LM loss alone (no balance or z-loss) is of the same order at
    every k. Renormalising a single probability (k=1) gave exactly 0: the router of every top-1
    sub-network learned only from the auxiliary losses."""
    model = make_model(replace(tiny_config, renormalize_top_k=renormalize)).train()
    E = tiny_config.experts  # 4: every k of the parametrisation is possible
    subnet = Subnet.uniform(range(tiny_config.layers), E, top_k, tiny_config.expert_width)
    x = tokens(tiny_config, B=4, T=16)
    out = model(x[:, :-1], subnet)
    F.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    norms = [b.moe.router.weight.grad.norm().item() for b in model.blocks]
    assert all(n > 1e-4 for n in norms), norms


def test_top1_gate_is_exactly_one_so_exports_stay_exact(tiny_config):
    """The top-1 straight-through gate has value exactly 1.0: the same output as a runtime that
    renormalises the top-k probabilities (Mixtral in transformers and llama.cpp)."""
    torch.manual_seed(0)
    moe = MoE(16, 4, 8, 0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(10, 16)
    y, _, _ = moe(x, LayerSpec(4, 1, 8))
    top_i = F.linear(x, moe.router.weight).argmax(-1)
    ref = torch.stack([moe_expert(moe, int(e), x[n]) for n, e in enumerate(top_i)])
    assert torch.equal(y, ref) or torch.allclose(y, ref, atol=1e-6)


def moe_expert(moe: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    h = F.silu(moe.w_gate[e] @ x_D) * (moe.w_up[e] @ x_D)
    return moe.w_down[e] @ h
