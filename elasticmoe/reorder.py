"""Importance re-ordering: make every prefix (of experts, of neurons) the best prefix.

Sub-networks keep the *first* experts of a layer and the *first* neurons of each expert, so
after measuring importance we permute the parameters (and the optimizer state with them) so
that the most important come first. For the full model these permutations are exact:

* experts: permuting router rows and expert tensors together leaves the softmax over all
  experts, the top-k set and every expert's output unchanged;
* neurons: permuting the hidden units of a SwiGLU expert (rows of gate/up, columns of down)
  leaves its output unchanged.

Layers cannot be permuted (order is computation); their importance instead sets
`model.layer_order`, the order in which depth-shrinking keeps them (`L6` keeps the first 6).

Importance measures (Once-For-All, Cai et al. 2020, sec. 3.2, re-orders channels by L1 norm;
for MoE we rank experts by routed probability mass as in expert-pruning work, e.g. Lu et al. 2024):

* expert mass: mean router probability of the expert over held-out tokens (full softmax);
* expert output: mean over routed tokens of gate weight x ||expert output||;
* neuron magnitude: ||gate row|| * ||up row|| * ||down column|| for each hidden unit;
* layer: mean relative change ||h_out - h_in|| / ||h_in|| of the residual stream; a layer that
  changes the stream least is dropped first.
"""

from __future__ import annotations

import torch

from .model import ElasticMoE, rope_cos_sin
from .subnet import Subnet


@torch.no_grad()
def measure_importance(model: ElasticMoE, batches: list[torch.Tensor], experts_by: str = "mass") -> dict:
    """Expert scores per layer (E,), neuron scores per layer (E, W), layer scores (L,)."""
    c = model.config
    full = Subnet.full(c)
    expert_scores = [torch.zeros(model.blocks[i].moe.router.weight.shape[0]) for i in range(c.layers)]
    layer_change = torch.zeros(c.layers)
    for tokens in batches:
        x = model.embed(tokens)
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(tokens.shape[1], device=tokens.device), x.dtype)
        for i, spec in zip(full.layers, full.specs):
            block = model.blocks[i]
            h = block.attention_half(x, cos, sin)
            hn = block.moe_norm(h).reshape(-1, c.d_model)
            probs = torch.softmax(torch.nn.functional.linear(hn, block.moe.router.weight).float(), dim=-1)
            if experts_by == "mass":
                expert_scores[i] += probs.mean(0).cpu()
            else:
                top_p, top_i = probs.topk(spec.top_k, dim=-1)
                top_p = top_p / top_p.sum(-1, keepdim=True)
                m = block.moe
                for e in range(probs.shape[1]):
                    rows = (top_i == e).nonzero()
                    if rows.numel() == 0:
                        continue
                    xe = hn[rows[:, 0]]
                    ye = (torch.nn.functional.silu(xe @ m.w_gate[e].T) * (xe @ m.w_up[e].T)) @ m.w_down[e].T
                    expert_scores[i][e] += (top_p[rows[:, 0], rows[:, 1]] * ye.norm(dim=-1)).sum().cpu() / hn.shape[0]
            out, _, _ = block.moe_half(h, spec)
            layer_change[i] += ((out - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6)).mean().cpu()
            x = out
    neuron_scores = []
    for i in range(c.layers):
        m = model.blocks[i].moe
        neuron_scores.append((m.w_gate.norm(dim=-1) * m.w_up.norm(dim=-1) * m.w_down.norm(dim=-2)).cpu())
    return {"experts": expert_scores, "neurons": neuron_scores, "layers": layer_change / max(len(batches), 1)}


def _permute_param(p: torch.nn.Parameter, index: torch.Tensor, dim: int, optimizer) -> None:
    """Permute parameter `p` along `dim` (gather by `index`) and every same-shaped optimizer state."""
    with torch.no_grad():
        p.copy_(p.index_select(dim, index.to(p.device)) if index.dim() == 1 else p.gather(dim, index.to(p.device)))
    if optimizer is not None and p in optimizer.state:
        for value in optimizer.state[p].values():
            if torch.is_tensor(value) and value.shape == p.shape:
                src = (
                    value.index_select(dim, index.to(value.device))
                    if index.dim() == 1
                    else value.gather(dim, index.to(value.device))
                )
                value.copy_(src)


def permute_experts(model: ElasticMoE, layer: int, perm: torch.Tensor, optimizer=None) -> None:
    """New expert e is old expert perm[e]: router rows and expert tensors move together."""
    m = model.blocks[layer].moe
    for p in (m.router.weight, m.w_gate, m.w_up, m.w_down):
        _permute_param(p, perm, 0, optimizer)


def permute_neurons(model: ElasticMoE, layer: int, perm_EW: torch.Tensor, optimizer=None) -> None:
    """For each expert e, new hidden unit j is old unit perm_EW[e, j]."""
    m = model.blocks[layer].moe
    E, W, D = m.w_gate.shape
    idx_rows = perm_EW[:, :, None].expand(E, W, D)
    _permute_param(m.w_gate, idx_rows, 1, optimizer)
    _permute_param(m.w_up, idx_rows, 1, optimizer)
    _permute_param(m.w_down, perm_EW[:, None, :].expand(E, D, W), 2, optimizer)


def reorder(
    model: ElasticMoE,
    batches: list[torch.Tensor],
    optimizer=None,
    experts_by: str = "mass",
    neurons: bool = True,
    layers: bool = True,
) -> dict:
    """Measure importance on `batches` (held-out validation tokens) and apply it. Returns a summary."""
    was_training = model.training
    model.eval()
    scores = measure_importance(model, batches, experts_by)
    summary: dict = {"expert_perms": [], "layer_order": None}
    for i in range(model.config.layers):
        perm = torch.argsort(scores["experts"][i], descending=True, stable=True)
        permute_experts(model, i, perm, optimizer)
        summary["expert_perms"].append(perm.tolist())
        if neurons:
            # neuron scores were measured before the expert permutation: reindex them to match
            perm_EW = torch.argsort(scores["neurons"][i][perm], dim=1, descending=True, stable=True)
            permute_neurons(model, i, perm_EW, optimizer)
    if layers:
        model.layer_order = torch.argsort(scores["layers"], descending=True, stable=True).tolist()
        summary["layer_order"] = list(model.layer_order)
    summary["layer_scores"] = scores["layers"].tolist()
    model.train(was_training)
    return summary
