"""Importance re-ordering: make every prefix (of experts, of neurons) the best prefix.

Sub-networks keep the *first* experts of a layer and the *first* neurons of each expert, so
after measuring importance we permute the parameters (and the optimizer state with them) so
that the most important come first. For the full model these permutations are exact:

* experts: permuting router rows, expert tensors and the router's selection bias (ERNIE-4.5)
  together leaves the softmax over all experts, the top-k set and every expert's output unchanged;
* neurons: permuting the hidden units of a SwiGLU expert (rows of gate/up, columns of down)
  leaves its output unchanged.

Layers cannot be permuted (order is computation); their importance instead sets
`model.layer_order`, the order in which depth-shrinking keeps them (`L6` keeps the first 6).
Dense layers (`ModelConfig.dense_layers`) have no experts and are kept whole, so only their
layer importance is measured: they are dropped by depth like any other layer.

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

from .model import ElasticMoE, document_mask, rope_cos_sin
from .subnet import Subnet


@torch.no_grad()
def measure_importance(
    model: ElasticMoE, batches: list[torch.Tensor], experts_by: str = "mass", doc_eos: int | None = None
) -> dict:
    """Expert scores per layer (E,), neuron scores per layer (E, W), layer scores (L,). `doc_eos`:
    attention kept inside each packed document, as in training (`data.document_mask`)."""
    c = model.config
    full = Subnet.full(c)
    expert_scores = [torch.zeros(0 if b.moe is None else b.moe.router.weight.shape[0]) for b in model.blocks]
    layer_change = torch.zeros(c.layers)
    for tokens in batches:
        x = model.embed(tokens)
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(tokens.shape[1], device=tokens.device), x.dtype)
        mask = None if doc_eos is None else document_mask(tokens, doc_eos)
        for i, spec in zip(full.layers, full.specs):
            block = model.blocks[i]
            h = block.attention_half(x, cos, sin, mask_BTT=mask)
            if block.moe is not None:
                hn = block.moe_norm(h).reshape(-1, c.d_model)
                expert_scores[i] += _expert_scores(block.moe, hn, spec, experts_by)
            out, _, _ = block.moe_half(h, spec)
            layer_change[i] += ((out - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6)).mean().cpu()
            x = out
    neuron_scores = []
    for block in model.blocks:
        m = block.moe
        scores = None if m is None else m.w_gate.norm(dim=-1) * m.w_up.norm(dim=-1) * m.w_down.norm(dim=-2)
        neuron_scores.append(None if scores is None else scores.cpu())
    return {"experts": expert_scores, "neurons": neuron_scores, "layers": layer_change / max(len(batches), 1)}


def _expert_scores(m, hn: torch.Tensor, spec, experts_by: str) -> torch.Tensor:
    """One batch's score of each expert of MoE `m` on its normed inputs `hn` (N, D)."""
    E = m.router.weight.shape[0]
    _, probs, top_p, top_i = m.route(hn, E, spec.top_k)  # the router as it computes, over all experts
    if experts_by == "mass":
        return probs.mean(0).cpu()
    scores = torch.zeros(E)
    for e in range(E):
        rows = (top_i == e).nonzero()
        if rows.numel() == 0:
            continue
        xe = hn[rows[:, 0]]
        ye = (torch.nn.functional.silu(xe @ m.w_gate[e].T) * (xe @ m.w_up[e].T)) @ m.w_down[e].T
        scores[e] = (top_p[rows[:, 0], rows[:, 1]] * ye.norm(dim=-1)).sum().cpu() / hn.shape[0]
    return scores


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
    """New expert e is old expert perm[e]: router rows, selection bias and expert tensors move together."""
    m = model.blocks[layer].moe
    for p in (m.router.weight, m.w_gate, m.w_up, m.w_down):
        _permute_param(p, perm, 0, optimizer)
    if m.router_bias is not None:  # a buffer: no optimizer state
        _permute_param(m.router_bias, perm, 0, None)


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
    doc_eos: int | None = None,
) -> dict:
    """Measure importance on `batches` (held-out validation tokens) and apply it. Returns a summary."""
    was_training = model.training
    model.eval()
    scores = measure_importance(model, batches, experts_by, doc_eos)
    summary: dict = {"expert_perms": [], "layer_order": None}
    for i in range(model.config.layers):
        if model.blocks[i].moe is None:  # a dense layer: nothing to re-order
            summary["expert_perms"].append([])
            continue
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
