"""The elastic MoE transformer, top to bottom: norm, RoPE, attention, router + experts, block, model.

Any sub-network runs directly: `model(tokens, subnet=spec)` runs only the kept layers; in each,
the router scores only the first `experts` experts and the experts use only their first `width`
neurons, all through slices (views) of the shared parameters: nothing is copied, masked or
computed and thrown away. The per-call choice is an argument, never a mode stored on modules.

Math follows Mixtral / Qwen3-MoE so an exporter can write a stock transformers checkpoint:
pre-RMSNorm (computed in float32), rotate-half RoPE, grouped-query attention through
`scaled_dot_product_attention`, softmax router over the kept experts in float32 whose top-k
probabilities are renormalised to sum to one (for top-1 the weight is 1 with a straight-through
gradient, see MoE.route), SwiGLU experts `down(silu(gate x) * up x)`. The options imported
architectures need (ModelConfig) change only what they name: q/k RMSNorm over the whole
projection (OLMoE), q/k/v biases, top-k weights not renormalised, and a shared expert scaled by a
sigmoid gate (Qwen2-MoE); dense layers (a plain SwiGLU in place of the MoE), a per-expert
selection bias on the router's scores and a floor on the renormalisation (ERNIE-4.5-MoE); a
sigmoid router, a scale on the routed weights and RoPE on part of each head (GLM-4.5 MoE). The
router's options live in one place (`Routing`). A shared expert and a dense layer are never cut
by a sub-network (a dense layer can still be dropped whole by depth, like any layer).
Interleaved-pair RoPE (ERNIE) needs no option: it is rotate-half with the q/k rows of each head
permuted (`rope_rows_from_pairs`), done at import.

Shape legend (suffixes on tensor names): B batch, T time (new tokens), S keys (cached + new),
D d_model, H query heads, G kv heads, Dh head dim, V vocab, E experts kept, K top-k,
W expert width kept, N tokens (B*T), A token-expert assignments (N*K), X a whole q or k projection
(heads x head dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .subnet import LayerSpec, Subnet


# -- norm and rotary embedding ----------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    freqs_TF = positions.float()[:, None] * inv_freq[None, :]
    emb_TDh = torch.cat([freqs_TF, freqs_TF], dim=-1)
    return emb_TDh.cos().to(dtype), emb_TDh.sin().to(dtype)


def apply_rope(x_BHTDh: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first R dims of each head (R = Dh but for partial RoPE, GLM-4.5)."""
    dims = cos_TR.shape[-1]
    if dims < x_BHTDh.shape[-1]:
        rot, keep = x_BHTDh[..., :dims], x_BHTDh[..., dims:]
        return torch.cat([apply_rope(rot, cos_TR, sin_TR), keep], dim=-1)
    half = dims // 2
    rotated = torch.cat([-x_BHTDh[..., half:], x_BHTDh[..., :half]], dim=-1)
    return x_BHTDh * cos_TR + rotated * sin_TR


def rope_rows_to_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from our rotate-half order (dims j and j + Dh/2 rotate together) to
    the adjacent-pair order (dims 2j and 2j+1; GPT-J, ERNIE-4.5, llama.cpp), per head. Both sides
    rotate pair j by the same frequency, so q.k and the model's function are unchanged."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def rope_rows_from_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `rope_rows_to_pairs`: adjacent-pair rows to rotate-half rows, per head."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


# -- KV cache ---------------------------------------------------------------------------------
class KVCache:
    """Preallocated keys/values for the kept layers of one sub-network (slot n = n-th kept layer)."""

    def __init__(self, depth: int, batch: int, max_len: int, kv_heads: int, head_dim: int, device, dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.length = 0
        self.max_len = max_len

    def update(self, slot: int, k_BGTDh: torch.Tensor, v_BGTDh: torch.Tensor):
        start, end = self.length, self.length + k_BGTDh.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[slot][:, :, start:end] = k_BGTDh
        self.v[slot][:, :, start:end] = v_BGTDh
        return self.k[slot][:, :, :end], self.v[slot][:, :, :end]


# -- attention --------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.d_model, c.heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.d_model, c.kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.d_model, bias=False)
        # q/k RMSNorm over each head (Qwen3-MoE) or over the whole projection (OLMoE)
        self.qk_norm_scope = c.qk_norm_scope if c.qk_norm else None
        per_head = c.qk_norm_scope == "head"
        self.q_norm = RMSNorm(c.head_dim if per_head else c.heads * c.head_dim, c.norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim if per_head else c.kv_heads * c.head_dim, c.norm_eps) if c.qk_norm else None

    def forward(self, x_BTD, cos_TDh, sin_TDh, cache: KVCache | None = None, slot: int = 0, mask_BTT=None):
        """`mask_BTT` (bool, True = may attend; no cache): a causal mask of the caller's, e.g. one that
        keeps each packed document to itself (`document_mask`); None is plain causal attention."""
        B, T, _ = x_BTD.shape
        q_BTX, k_BTX = self.q_proj(x_BTD), self.k_proj(x_BTD)
        if self.qk_norm_scope == "all":
            q_BTX, k_BTX = self.q_norm(q_BTX), self.k_norm(k_BTX)
        q_BTHDh = q_BTX.view(B, T, self.heads, self.head_dim)
        k_BTGDh = k_BTX.view(B, T, self.kv_heads, self.head_dim)
        v_BGTDh = self.v_proj(x_BTD).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm_scope == "head":
            q_BTHDh, k_BTGDh = self.q_norm(q_BTHDh), self.k_norm(k_BTGDh)
        q_BHTDh = apply_rope(q_BTHDh.transpose(1, 2), cos_TDh, sin_TDh)
        k_BGTDh = apply_rope(k_BTGDh.transpose(1, 2), cos_TDh, sin_TDh)
        start = 0
        if cache is not None:
            start = cache.length
            k_BGTDh, v_BGTDh = cache.update(slot, k_BGTDh, v_BGTDh)
        if mask_BTT is not None:
            if cache is not None:
                raise ValueError("an attention mask cannot be combined with a KV cache")
            mask, causal = mask_BTT[:, None], False
        elif start == 0:
            mask, causal = None, T > 1
        else:  # new queries sit at positions start..start+T-1 and see every earlier key
            S = k_BGTDh.shape[2]
            keys, queries = torch.arange(S, device=x_BTD.device), start + torch.arange(T, device=x_BTD.device)
            mask = keys[None, :] <= queries[:, None]
            causal = False
        y_BHTDh = F.scaled_dot_product_attention(
            q_BHTDh, k_BGTDh, v_BGTDh, attn_mask=mask, is_causal=causal, enable_gqa=self.heads != self.kv_heads
        )
        return self.o_proj(y_BHTDh.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


# -- experts and dispatch ---------------------------------------------------------------------
def _grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def _grouped_mm_aligned(x_AD: torch.Tensor, width: int, *weights: torch.Tensor) -> bool:
    """`torch._grouped_mm` rejects operands whose strides are not multiples of 16 bytes (fp32: d_model,
    the kept width and the stored width must be multiples of 4), e.g. W5 or d_model 30."""
    dims = [x_AD.shape[-1], width] + [s for w in weights for s in w.stride() if s != 1]
    return all(d * x_AD.element_size() % 16 == 0 for d in dims)


class _GroupedMM(torch.autograd.Function):
    """`torch._grouped_mm` with a backward that zeroes the weight gradient of empty groups.

    grouped-mm writes nothing for an expert that received no rows, so its slice of the weight
    gradient would be uninitialised memory (NaN or garbage) if taken straight from the kernel.
    """

    @staticmethod
    def forward(ctx, x_AI, w_EIO, offs_E):
        ctx.save_for_backward(x_AI, w_EIO, offs_E)
        return torch._grouped_mm(x_AI, w_EIO, offs=offs_E)

    @staticmethod
    def backward(ctx, g_AO):
        x_AI, w_EIO, offs_E = ctx.saved_tensors
        g_AO = g_AO.contiguous()
        gx_AI = torch._grouped_mm(g_AO, w_EIO.transpose(-2, -1), offs=offs_E)
        gw_EIO = torch._grouped_mm(x_AI.transpose(0, 1), g_AO, offs=offs_E)
        sizes_E = offs_E - F.pad(offs_E[:-1], (1, 0))
        gw_EIO = torch.where((sizes_E == 0)[:, None, None], torch.zeros_like(gw_EIO), gw_EIO)
        return gx_AI, gw_EIO, None


def experts_loop(x_AD, counts: list[int], w_gate_EWD, w_up_EWD, w_down_EDW) -> torch.Tensor:
    """SwiGLU experts over expert-sorted rows: one contiguous chunk per expert, empty ones skipped.

    Per-expert weights come from `unbind`, whose backward stacks the E gradients once; indexing
    `w[e]` instead makes every expert's backward zero-fill a full (E, W, D) gradient (O(E^2) work)."""
    outs = []
    gates_WD, ups_WD, downs_DW = w_gate_EWD.unbind(0), w_up_EWD.unbind(0), w_down_EDW.unbind(0)
    for e, chunk_CD in enumerate(x_AD.split(counts)):
        if counts[e] == 0:
            continue
        h_CW = F.silu(chunk_CD @ gates_WD[e].T) * (chunk_CD @ ups_WD[e].T)
        outs.append(h_CW @ downs_DW[e].T)
    return torch.cat(outs) if outs else x_AD.new_zeros(x_AD.shape)


def experts_grouped(x_AD, counts_E: torch.Tensor, w_gate_EWD, w_up_EWD, w_down_EDW) -> torch.Tensor:
    """The same computation as `experts_loop` through grouped GEMMs (three kernel launches)."""
    offs_E = counts_E.cumsum(0).to(torch.int32)
    g_AW = _GroupedMM.apply(x_AD, w_gate_EWD.transpose(-2, -1), offs_E)
    u_AW = _GroupedMM.apply(x_AD, w_up_EWD.transpose(-2, -1), offs_E)
    y_AD = _GroupedMM.apply(F.silu(g_AW) * u_AW, w_down_EDW.transpose(-2, -1), offs_E)
    rows = int(offs_E[-1]) if offs_E.numel() else 0
    if rows < y_AD.shape[0]:  # rows past the last offset are never written by the kernel
        y_AD = torch.cat([y_AD[:rows], y_AD.new_zeros(y_AD.shape[0] - rows, y_AD.shape[1])])
    return y_AD


def moe_dispatch(x_ND, weights_NK, experts_NK, w_gate_EWD, w_up_EWD, w_down_EDW, method: str = "loop"):
    """Sort token-expert assignments by expert, run each expert on its contiguous chunk,
    scale by the gate weights and scatter back with `index_add_`. No O(E x N) masks.
    "grouped" falls back to the (numerically equivalent) loop where grouped GEMM cannot run."""
    N, K = experts_NK.shape
    E = w_gate_EWD.shape[0]
    flat_A = experts_NK.reshape(-1)
    order_A = flat_A.argsort(stable=True)
    token_A = order_A // K
    counts_E = torch.bincount(flat_A, minlength=E)
    x_AD = x_ND[token_A]
    if (
        method == "grouped"
        and _grouped_mm_available()
        and _grouped_mm_aligned(x_ND, w_gate_EWD.shape[1], w_gate_EWD, w_up_EWD, w_down_EDW)
    ):
        # grouped-mm has no autocast kernel: apply the autocast dtype (bf16 on GPU) by hand
        dt = torch.get_autocast_dtype(x_ND.device.type) if torch.is_autocast_enabled(x_ND.device.type) else None
        if dt is not None:
            x_AD, w_gate_EWD, w_up_EWD, w_down_EDW = (t.to(dt) for t in (x_AD, w_gate_EWD, w_up_EWD, w_down_EDW))
        y_AD = experts_grouped(x_AD, counts_E, w_gate_EWD, w_up_EWD, w_down_EDW)
    else:
        y_AD = experts_loop(x_AD, counts_E.tolist(), w_gate_EWD, w_up_EWD, w_down_EDW)
    y_AD = y_AD * weights_NK.reshape(-1)[order_A, None].to(y_AD.dtype)
    # under autocast the experts' output is bf16 while the residual stream stays float32
    return torch.zeros_like(x_ND).index_add_(0, token_A, y_AD.to(x_ND.dtype))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, width, bias=False)
        self.up_proj = nn.Linear(d_model, width, bias=False)
        self.down_proj = nn.Linear(width, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass(frozen=True)
class Routing:
    """How a router turns its logits into the top-k experts' weights (ModelConfig's router options).

    `score`: "softmax" over the experts (Mixtral, Qwen, OLMoE, ERNIE) or "sigmoid" per expert
    (GLM-4.5). `renormalize`: the k kept scores are divided by their sum (Mixtral, Qwen3-MoE,
    ERNIE, GLM), else used as they are (`norm_topk_prob: false` in OLMoE and Qwen2-MoE); the sum
    is floored at `renormalize_min` (ERNIE's `moe_norm_min`) and has `renormalize_eps` added
    (GLM: 1e-20). `scale` multiplies the weights at the end (GLM's `routed_scaling_factor`)."""

    score: str = "softmax"
    renormalize: bool = True
    renormalize_min: float = 0.0
    renormalize_eps: float = 0.0
    scale: float = 1.0

    @classmethod
    def of(cls, c: ModelConfig) -> Routing:
        return cls(c.router_score, c.renormalize_top_k, c.renormalize_min, c.renormalize_eps, c.routed_scale)

    def denominator(self, total: torch.Tensor) -> torch.Tensor:
        if self.renormalize_min > 0:
            total = total.clamp_min(self.renormalize_min)
        return total + self.renormalize_eps if self.renormalize_eps > 0 else total


class MoE(nn.Module):
    """Router + stacked experts (+ optional shared expert). Expert tensors are (E, W, D) for
    gate/up and (E, D, W) for down, so an expert-prefix and a width-prefix are plain slices.

    `routing`: how scores become weights (`Routing`). `shared_gate`: the shared expert's output is
    scaled by `sigmoid(shared_gate(x))` per token (Qwen2-MoE). `selection_bias`: a per-expert
    float32 buffer `router_bias` added to the scores to choose the top-k, never to weigh them
    (ERNIE-4.5's and GLM-4.5's `e_score_correction_bias`); it is not trained here, and it moves and
    is sliced with its expert (re-ordering, extraction)."""

    def __init__(
        self,
        d_model: int,
        experts: int,
        width: int,
        shared_width: int,
        shared_gate: bool = False,
        routing: Routing = Routing(),
        selection_bias: bool = False,
    ):
        super().__init__()
        self.routing = routing
        self.router = nn.Linear(d_model, experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(experts, width, d_model))
        self.w_up = nn.Parameter(torch.empty(experts, width, d_model))
        self.w_down = nn.Parameter(torch.empty(experts, d_model, width))
        self.shared = SwiGLU(d_model, shared_width) if shared_width > 0 else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if shared_gate else None
        bias = torch.zeros(experts, dtype=torch.float32) if selection_bias else None
        self.register_buffer("router_bias", bias)  # None: no buffer in the state dict

    def route(self, x_ND: torch.Tensor, experts: int, top_k: int):
        """(logits_NE, probs_NE, weights_NK, chosen_NK) over the first `experts` experts: scores in
        float32 (a softmax, or a sigmoid per expert), the top-k of the scores (plus the selection
        bias, if any), weighted by their scores, renormalised or not, scaled."""
        r, w_ED = self.routing, self.router.weight[:experts]
        # a float32 router beside bf16 weights (ERNIE's files) reads its input in float32
        logits_NE = F.linear(x_ND.to(w_ED.dtype), w_ED)
        probs_NE = logits_NE.float().sigmoid() if r.score == "sigmoid" else logits_NE.float().softmax(dim=-1)
        if self.router_bias is None:
            top_p_NK, top_i_NK = probs_NE.topk(top_k, dim=-1)
        else:  # ERNIE-4.5, GLM-4.5: choose on biased scores, weigh by the unbiased ones
            top_i_NK = (probs_NE + self.router_bias[:experts].float()).topk(top_k, dim=-1).indices
            top_p_NK = probs_NE.gather(-1, top_i_NK)
        # Without renormalisation each chosen expert weighs its score as it is (OLMoE, Qwen2-MoE).
        if r.renormalize and top_k == 1:
            # Renormalising one probability gives exactly 1 and no gradient, so a k=1 router would
            # learn from the auxiliary losses alone. p / stop_grad(p) keeps the value exactly 1.0
            # (what Mixtral-style runtimes compute, so exports stay exact) with gradient d log p:
            # a straight-through gate that tells the router whether its choice helped the loss.
            top_p_NK = top_p_NK / r.denominator(top_p_NK.detach())
        elif r.renormalize:
            top_p_NK = top_p_NK / r.denominator(top_p_NK.sum(dim=-1, keepdim=True))
        if r.scale != 1.0:
            top_p_NK = top_p_NK * r.scale
        return logits_NE, probs_NE, top_p_NK, top_i_NK

    def forward(self, x_ND: torch.Tensor, spec: LayerSpec, dispatch: str = "auto"):
        """`dispatch`: "auto" (grouped GEMM on CUDA, the loop elsewhere), "loop" or "grouped"."""
        E, K, W = spec.experts, spec.top_k, spec.width
        logits_NE, probs_NE, top_p_NK, top_i_NK = self.route(x_ND, E, K)
        method = dispatch
        if method == "auto":
            method = "grouped" if x_ND.is_cuda and _grouped_mm_available() else "loop"
        y_ND = moe_dispatch(
            x_ND, top_p_NK, top_i_NK, self.w_gate[:E, :W], self.w_up[:E, :W], self.w_down[:E, :, :W], method
        )
        if self.shared is not None:
            shared_ND = self.shared(x_ND)
            if self.shared_gate is not None:
                shared_ND = torch.sigmoid(self.shared_gate(x_ND)) * shared_ND
            y_ND = y_ND + shared_ND
        if not torch.is_grad_enabled():  # inference: the auxiliary losses are never used, skip their ops
            zero = logits_NE.new_zeros((), dtype=torch.float32)
            return y_ND, zero, zero
        # Switch Transformer load balance (Fedus et al. 2021, eq. 4) over the kept experts:
        # E * sum_e f_e * P_e, f_e = fraction of assignments to e, P_e = mean router probability.
        f_E = torch.bincount(top_i_NK.reshape(-1), minlength=E).float() / top_i_NK.numel()
        if self.routing.score == "sigmoid":  # P_e from scores normalised per token (DeepSeek-V3, eq. 18-20)
            probs_NE = probs_NE / probs_NE.sum(dim=-1, keepdim=True)
        aux = E * (f_E * probs_NE.mean(dim=0)).sum()
        # Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean squared log-partition.
        z = torch.logsumexp(logits_NE.float(), dim=-1).square().mean()
        return y_ND, aux, z


# -- block and model --------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm attention, then the MoE; or, in a dense layer (`ModelConfig.dense_layers`), a plain
    SwiGLU `mlp` of `dense_width` in the MoE's place, which ignores the layer's spec (kept whole)."""

    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        experts, _, width = c.layer_shape(index)
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c)
        self.moe_norm = RMSNorm(c.d_model, c.norm_eps)
        self.moe, self.mlp = None, None
        if c.is_dense(index):
            self.mlp = SwiGLU(c.d_model, c.dense_width)
        else:
            self.moe = MoE(
                c.d_model, experts, width, c.shared_expert_width, c.shared_expert_gate, Routing.of(c), c.router_bias
            )

    def forward(self, x_BTD, cos, sin, spec: LayerSpec, cache=None, slot=0, dispatch: str = "auto", mask_BTT=None):
        return self.moe_half(self.attention_half(x_BTD, cos, sin, cache, slot, mask_BTT), spec, dispatch)

    # the two residual halves, also run on their own by re-ordering (importance) and latency tables
    def attention_half(self, x_BTD, cos, sin, cache=None, slot=0, mask_BTT=None):
        return x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, cache, slot, mask_BTT)

    def moe_half(self, x_BTD, spec: LayerSpec, dispatch: str = "auto"):
        if self.moe is None:  # a dense layer: no router, no auxiliary losses
            zero = x_BTD.new_zeros((), dtype=torch.float32)
            return x_BTD + self.mlp(self.moe_norm(x_BTD)), zero, zero
        B, T, D = x_BTD.shape
        y_ND, aux, z = self.moe(self.moe_norm(x_BTD).reshape(B * T, D), spec, dispatch)
        return x_BTD + y_ND.view(B, T, D), aux, z


def document_mask(tokens_BT: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T, T) bool: query t may attend to key s when s <= t and both lie in the same document of
    the packed row. An EOS starts a document (it is the BOS of the one after it, as in evaluation's
    [EOS] + prompt), so the token that predicts an EOS still sees its document, and the EOS, which
    predicts the next document's first token, sees only itself. Packing without it lets a query see
    earlier examples' keys (the same letters with other values), which a retrieval must then learn
    to ignore (bench/TASKS.md, one example per row)."""
    doc_BT = (tokens_BT == eos_id).cumsum(1)
    T = tokens_BT.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=tokens_BT.device).tril()
    return (doc_BT[:, :, None] == doc_BT[:, None, :]) & causal_TT


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    aux_loss: torch.Tensor  # load-balance loss, mean over kept MoE layers
    z_loss: torch.Tensor  # router z-loss, mean over kept MoE layers


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE's inverse frequencies theta^(-2i/R), i < R / 2 (Su et al. 2021), R the rotated dims of a
    head (all of it, or `rope_dims`)."""
    dims = config.rotary_dims
    return 1.0 / (config.rope_theta ** (torch.arange(0, dims, 2).float() / dims))


class ElasticMoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        # Layers in keep-priority order (most important first): `L6` keeps the first 6 of these.
        self.layer_order: list[int] = list(range(config.layers))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        out_std = std / (2 * self.config.layers) ** 0.5  # GPT-2 style scaling of residual writes
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "w_down", "down_proj.weight")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)

    def resolve(self, subnet: Subnet | None) -> Subnet:
        return Subnet.full(self.config) if subnet is None else subnet.validate(self.config)

    def forward(
        self,
        tokens_BT: torch.Tensor,
        subnet: Subnet | None = None,
        cache: KVCache | None = None,
        dispatch: str = "auto",
        doc_eos: int | None = None,
    ) -> ModelOutput:
        """`dispatch` picks the MoE kernel (see MoE.forward); every choice gives the same function.
        `doc_eos` (an EOS id; for packed rows): each token attends only within its own document, an EOS
        starting one (`document_mask`); a row that is one document gives the same logits either way."""
        subnet = self.resolve(subnet)
        B, T = tokens_BT.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        x_BTD = self.embed(tokens_BT)
        positions = torch.arange(start, start + T, device=tokens_BT.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x_BTD.dtype)
        mask_BTT = None if doc_eos is None else document_mask(tokens_BT, doc_eos)
        aux = x_BTD.new_zeros((), dtype=torch.float32)
        z = x_BTD.new_zeros((), dtype=torch.float32)
        for slot, (i, spec) in enumerate(zip(subnet.layers, subnet.specs)):
            x_BTD, a, zz = self.blocks[i](x_BTD, cos, sin, spec, cache, slot, dispatch, mask_BTT)
            aux, z = aux + a, z + zz
        if cache is not None:
            cache.length += T
        x_BTD = self.norm(x_BTD)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x_BTD, weight)
        routed = max(1, sum(not self.config.is_dense(i) for i in subnet.layers))
        return ModelOutput(logits, aux / routed, z / routed)

    def new_cache(self, batch: int, max_len: int, subnet: Subnet | None = None) -> KVCache:
        c = self.config
        p = self.embed.weight
        return KVCache(self.resolve(subnet).depth, batch, max_len, c.kv_heads, c.head_dim, p.device, p.dtype)

    @torch.no_grad()
    def generate(
        self,
        prompt_BT: torch.Tensor,
        max_new_tokens: int,
        subnet: Subnet | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
    ) -> torch.Tensor:
        """KV-cached sampling; temperature 0 is greedy. Returns prompt + new tokens."""
        B, T = prompt_BT.shape
        total = min(T + max_new_tokens, self.config.max_seq_len)
        cache = self.new_cache(B, total, subnet)
        out, nxt = prompt_BT, prompt_BT
        done = torch.zeros(B, dtype=torch.bool, device=prompt_BT.device)
        for _ in range(total - T):
            logits_BV = self(nxt, subnet, cache).logits[:, -1].float()
            if temperature <= 0:
                tok_B = logits_BV.argmax(-1)
            else:
                logits_BV = logits_BV / temperature
                if top_k:
                    kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
                    logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
                tok_B = torch.multinomial(logits_BV.softmax(-1), 1, generator=generator)[:, 0]
            if eos_id is not None:
                tok_B = torch.where(done, torch.full_like(tok_B, eos_id), tok_B)
                done |= tok_B == eos_id
            nxt = tok_B[:, None]
            out = torch.cat([out, nxt], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
