"""The one cost model: parameters, active parameters, FLOPs per token and memory, analytically.

Conventions (used by search, the ledger and reports alike):

* **total params**: every weight the sub-network touches (embedding, kept layers with all kept
  experts, final norm, LM head unless tied). Equals the numel of an extracted child's tensors.
* **active params per token**: total minus the weights of the kept experts a token is *not*
  routed to, i.e. per layer (experts_kept - top_k) * 3 * d_model * width. Embeddings included,
  as in Mixtral's "12.9B active" figure.
* **FLOPs per token (forward)**: 2 FLOPs per multiply-accumulate over every matmul a token
  passes through: q/k/v/o projections, router over the kept experts, top_k SwiGLU experts
  (3 matmuls each), the shared expert, the LM head; plus attention scores and values,
  2 * 2 * heads * head_dim * seq_len per layer, PaLM-style (Chowdhery et al. 2022, appendix B):
  no halving for the causal mask, which is also what `FlopCounterMode` counts for SDPA.
  Norms, RoPE, softmax and the embedding lookup are not counted (they are not matmuls).
* **forward + backward** = 3 x forward (backward costs two matmuls per forward matmul).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .subnet import Subnet


@dataclass(frozen=True)
class Cost:
    total_params: int
    active_params: int
    flops_forward: int  # per token, at `seq_len`
    seq_len: int

    @property
    def flops_train(self) -> int:
        """Forward + backward FLOPs per token."""
        return 3 * self.flops_forward


def _attn_params(c: ModelConfig) -> int:
    q = c.d_model * c.heads * c.head_dim
    kv = 2 * c.d_model * c.kv_heads * c.head_dim
    o = c.heads * c.head_dim * c.d_model
    bias = (c.heads + 2 * c.kv_heads) * c.head_dim if c.qkv_bias else 0
    norms = 0
    if c.qk_norm:  # per head: one Dh vector each for q and k; whole projection (OLMoE): its width
        norms = 2 * c.head_dim if c.qk_norm_scope == "head" else (c.heads + c.kv_heads) * c.head_dim
    return q + kv + o + bias + norms


def _shared_params(c: ModelConfig) -> int:
    """The shared expert (kept whole by every sub-network) and its sigmoid gate (Qwen2-MoE)."""
    return 3 * c.d_model * c.shared_expert_width + (c.d_model if c.shared_expert_gate else 0)


def layer_params(c: ModelConfig, experts: int, top_k: int, width: int) -> tuple[int, int]:
    """(total, active) parameters of one block with the given elastic choices."""
    per_expert = 3 * c.d_model * width
    fixed = _attn_params(c) + 2 * c.d_model + experts * c.d_model + _shared_params(c)  # + two norms + router
    return fixed + experts * per_expert, fixed + top_k * per_expert


def layer_flops(c: ModelConfig, experts: int, top_k: int, width: int, seq_len: int) -> int:
    """Forward FLOPs per token of one block (see module docstring)."""
    proj = c.d_model * (c.heads + 2 * c.kv_heads) * c.head_dim + c.heads * c.head_dim * c.d_model
    attn = 2 * c.heads * c.head_dim * seq_len  # QK^T and AV, MACs per token
    router = c.d_model * experts
    moe = top_k * 3 * c.d_model * width + _shared_params(c)
    return 2 * (proj + attn + router + moe)


def cost(c: ModelConfig, subnet: Subnet | None = None, seq_len: int | None = None) -> Cost:
    """Cost of `subnet` of parent `c` (the whole parent if None) at context length `seq_len`."""
    subnet = subnet or Subnet.full(c)
    seq_len = seq_len or c.max_seq_len
    embed = c.vocab_size * c.d_model
    head = 0 if c.tie_embeddings else c.vocab_size * c.d_model
    total = active = embed + head + c.d_model
    flops = 2 * c.vocab_size * c.d_model  # LM head matmul (also counted when tied)
    for s in subnet.specs:
        t, a = layer_params(c, s.experts, s.top_k, s.width)
        total += t
        active += a
        flops += layer_flops(c, s.experts, s.top_k, s.width, seq_len)
    return Cost(total, active, flops, seq_len)


def config_params(c: ModelConfig) -> int:
    """Total parameters of the whole model `c` describes, without building a Subnet (a config read
    from disk may claim 1e9 layers: this is arithmetic on its fields, never a loop over them)."""
    uniform = layer_params(c, c.experts, c.top_k, c.expert_width)[0]
    layers = sum(layer_params(c, *s)[0] for s in c.layer_shapes) if c.layer_shapes else c.layers * uniform
    return c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2) + c.d_model + layers


def memory_bytes(
    c: ModelConfig, subnet: Subnet | None = None, seq_len: int | None = None, batch: int = 1, bytes_per: int = 4
) -> int:
    """Resident weights (all kept experts) plus the KV cache for `batch` sequences of `seq_len`."""
    subnet = subnet or Subnet.full(c)
    seq_len = seq_len or c.max_seq_len
    weights = cost(c, subnet, seq_len).total_params * bytes_per
    kv = 2 * subnet.depth * c.kv_heads * c.head_dim * seq_len * batch * bytes_per
    return weights + kv


def child_config(c: ModelConfig, subnet: Subnet) -> ModelConfig:
    """The ModelConfig of the standalone child of `subnet` (per-layer shapes if not uniform)."""
    from dataclasses import replace

    subnet.validate(c)
    first = subnet.specs[0]
    if subnet.is_uniform:
        return replace(
            c, layers=subnet.depth, experts=first.experts, top_k=first.top_k, expert_width=first.width, layer_shapes=()
        )
    shapes = tuple((s.experts, s.top_k, s.width) for s in subnet.specs)
    return replace(
        c,
        layers=subnet.depth,
        experts=max(s[0] for s in shapes),
        top_k=max(s[1] for s in shapes),
        expert_width=max(s[2] for s in shapes),
        layer_shapes=shapes,
    )
