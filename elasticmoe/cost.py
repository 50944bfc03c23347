"""The one cost model: parameters, active parameters, FLOPs per token and memory, analytically.

Conventions (used by search, the ledger and reports alike):

* **total params**: every weight the sub-network touches (embedding, kept layers with all kept
  experts, final norm, LM head unless tied). Equals the numel of an extracted child's tensors.
* **active params per token**: total minus the weights of the kept experts a token is *not*
  routed to, i.e. per layer (experts_kept - top_k) * 3 * d_model * width. Embeddings included,
  as in Mixtral's "12.9B active" figure.
* **dense layers** (`ModelConfig.dense_layers`, ERNIE-4.5's leading layers): attention, two
  norms and one SwiGLU of `dense_width`, all active, whatever the layer's spec says (kept whole).
  The shared expert is kept whole too: counted in total and active alike. The router's
  selection bias (E floats per layer, a routing statistic, not trained) is not a parameter.
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


def dense_layer_params(c: ModelConfig) -> int:
    """Parameters of a dense layer (attention, two norms, one SwiGLU of `dense_width`): all active."""
    return _attn_params(c) + 2 * c.d_model + 3 * c.d_model * c.dense_width


def _attn_macs(c: ModelConfig, seq_len: int) -> int:
    proj = c.d_model * (c.heads + 2 * c.kv_heads) * c.head_dim + c.heads * c.head_dim * c.d_model
    return proj + 2 * c.heads * c.head_dim * seq_len  # + QK^T and AV, MACs per token


def layer_flops(c: ModelConfig, experts: int, top_k: int, width: int, seq_len: int) -> int:
    """Forward FLOPs per token of one MoE block (see module docstring)."""
    router = c.d_model * experts
    moe = top_k * 3 * c.d_model * width + _shared_params(c)
    return 2 * (_attn_macs(c, seq_len) + router + moe)


def dense_layer_flops(c: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of one dense block."""
    return 2 * (_attn_macs(c, seq_len) + 3 * c.d_model * c.dense_width)


def cost(c: ModelConfig, subnet: Subnet | None = None, seq_len: int | None = None) -> Cost:
    """Cost of `subnet` of parent `c` (the whole parent if None) at context length `seq_len`."""
    subnet = subnet or Subnet.full(c)
    seq_len = seq_len or c.max_seq_len
    embed = c.vocab_size * c.d_model
    head = 0 if c.tie_embeddings else c.vocab_size * c.d_model
    total = active = embed + head + c.d_model
    flops = 2 * c.vocab_size * c.d_model  # LM head matmul (also counted when tied)
    for i, s in zip(subnet.layers, subnet.specs):
        if c.is_dense(i):
            t = a = dense_layer_params(c)
            flops += dense_layer_flops(c, seq_len)
        else:
            t, a = layer_params(c, s.experts, s.top_k, s.width)
            flops += layer_flops(c, s.experts, s.top_k, s.width, seq_len)
        total += t
        active += a
    return Cost(total, active, flops, seq_len)


def config_params(c: ModelConfig) -> int:
    """Total parameters of the whole model `c` describes, without building a Subnet (a config read
    from disk may claim 1e9 layers: this is arithmetic on its fields, never a loop over them)."""
    uniform = layer_params(c, c.experts, c.top_k, c.expert_width)[0]
    moe_layers = c.layers - len(c.dense_layers)
    if c.layer_shapes:
        layers = sum(layer_params(c, *s)[0] for i, s in enumerate(c.layer_shapes) if not c.is_dense(i))
    else:
        layers = moe_layers * uniform
    layers += len(c.dense_layers) * dense_layer_params(c)
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
    """The ModelConfig of the standalone child of `subnet` (per-layer shapes if not uniform).

    Kept dense layers stay dense (renumbered to the child's slots) with the parent's width; their
    specs do not count towards uniformity, and in per-layer shapes they hold the largest shape."""
    from dataclasses import replace

    subnet.validate(c)
    dense = tuple(n for n, i in enumerate(subnet.layers) if c.is_dense(i))
    moe_specs = [s for i, s in zip(subnet.layers, subnet.specs) if not c.is_dense(i)] or list(subnet.specs[:1])
    kept = dict(layers=subnet.depth, dense_layers=dense, dense_width=c.dense_width if dense else 0)
    if len(set(moe_specs)) == 1:
        first = moe_specs[0]
        return replace(c, **kept, experts=first.experts, top_k=first.top_k, expert_width=first.width, layer_shapes=())
    largest = (max(s.experts for s in moe_specs), max(s.top_k for s in moe_specs), max(s.width for s in moe_specs))
    shapes = tuple(largest if n in dense else (s.experts, s.top_k, s.width) for n, s in enumerate(subnet.specs))
    return replace(c, **kept, experts=largest[0], top_k=largest[1], expert_width=largest[2], layer_shapes=shapes)
