"""Hugging Face transformers export (stock architectures, no custom code); import is `hf_import`.

Architecture mapping. Our block *is* a stock block. A model imported from transformers carries
its source class (`ModelConfig.source_architecture`) and exports back to it, children included;
a model trained here exports by `qk_norm`:

* `MixtralForCausalLM` (`mixtral`): no q/k norm, top-k always renormalised;
* `Qwen3MoeForCausalLM` (`qwen3_moe`): `qk_norm` per head, `renormalize_top_k` as `norm_topk_prob`;
* `OlmoeForCausalLM` (`olmoe`): `qk_norm_scope="all"`, `renormalize_top_k` as `norm_topk_prob`;
* `Qwen2MoeForCausalLM` (`qwen2_moe`): a shared expert with `shared_expert_gate`, `qkv_bias`,
  `renormalize_top_k` as `norm_topk_prob`;
* `Ernie4_5_MoeForCausalLM` (`ernie4_5_moe`): `dense_layers` (from `moe_layer_start_index`,
  `moe_layer_end_index`, `moe_layer_interval`) of `dense_width` (`intermediate_size`), ungated
  shared experts (`shared_expert_width = moe_num_shared_experts x moe_intermediate_size`),
  `router_bias` (`mlp.moe_statics.e_score_correction_bias`, stored (1, E)), `renormalize_min`
  (`moe_norm_min`), adjacent-pair RoPE (q/k rows permuted per head, `rope_rows_to_pairs`), no
  biases (`use_bias: true` is refused);
* `Glm4MoeForCausalLM` (`glm4_moe`): the first `first_k_dense_replace` layers dense, ungated
  shared experts (`n_shared_experts x moe_intermediate_size`), `router_score="sigmoid"` with
  `router_bias` (`mlp.gate.e_score_correction_bias`, (E,)), `renormalize_eps=1e-20` when
  `norm_topk_prob`, `routed_scale` (`routed_scaling_factor`), `rope_dims` (`partial_rotary_factor`
  x head_dim), `qk_norm` per head as `use_qk_norm`, `qkv_bias` as `attention_bias`; one expert
  group only (`n_group > 1` is refused); the multi-token-prediction layer is left out at import
  (as transformers leaves it) and an export states `num_nextn_predict_layers: 0`.

Elastic in all six: layers, experts, top-k, expert width; kept whole: attention, norms,
Qwen2-MoE's shared expert with its gate, ERNIE's and GLM's shared experts and dense layers.
Every other layer is sparse (Qwen: `decoder_sparse_step=1`, `mlp_only_layers=[]`).

Conventions fixed by this mapping (each is what both sides compute; the parity tests prove it):

* router: softmax over the experts in float32 (GLM: a sigmoid per expert), top-k of the
  scores (ERNIE, GLM: of the scores plus the selection bias), the k kept scores renormalised to
  sum to one when `renormalize_top_k` (Mixtral and ERNIE always, ERNIE over max(sum,
  `moe_norm_min`), GLM over sum + 1e-20; the others by `norm_topk_prob`), else used as they are,
  then scaled by `routed_scale` (GLM); no jitter at inference;
* shared expert (Qwen2-MoE, ERNIE, GLM): a SwiGLU expert every token passes through, added to the
  routed experts' output, in Qwen2-MoE scaled by `sigmoid(shared_expert_gate x)`; other
  architectures have none, and a model with one is refused for them;
* q/k norm: Qwen3-MoE's RMSNorm over each head (`head_dim` weights); OLMoE's over the whole
  q and k projections (`heads * head_dim`, `kv_heads * head_dim` weights), which is why OLMoE and
  Qwen2-MoE (which derive `head_dim = hidden_size / heads`) need `heads * head_dim = d_model`;
* experts: SwiGLU `down(silu(gate x) * up x)`, no biases; Mixtral's on-disk names are
  w1 = gate, w3 = up, w2 = down;
* RoPE: rotate-half (GPT-NeoX) convention, `rope_parameters = {"rope_type": "default",
  "rope_theta": theta}` (where transformers 5.x reads it) and the same theta as top-level
  `rope_theta` (where 4.x reads it: without it, 4.x silently takes Mixtral's default 1e6), applied
  to the whole head (`head_dim` stated explicitly), after Qwen3's per-head q/k RMSNorm;
* attention: grouped-query, scale `head_dim ** -0.5`, no output bias, q/k/v biases only in
  Qwen2-MoE (`qkv_bias`; transformers 4.x always builds them, so a Qwen2-MoE export without them
  loads only in 5.x), full causal attention (`sliding_window=null`, `use_sliding_window=false`),
  no dropout, no `clip_qkv` (OLMoE);
* RMSNorm: `weight * x * rsqrt(mean(x^2) + eps)` computed in float32, `rms_norm_eps = norm_eps`;
  pre-norm (`input_layernorm` before attention, `post_attention_layernorm` before the MoE);
* embeddings: tied exactly when `tie_embeddings` (`tie_word_embeddings`); tied folders carry no
  `lm_head.weight`;
* weights on disk: one `model.safetensors` (metadata `format: pt`) with the per-expert key names
  `save_pretrained` writes in transformers 5.x, float32 as stored in the model; config.json states
  the dtype both as `dtype` (5.x) and `torch_dtype` (4.x), and the `transformers_version` it was
  written for;
* tokens: `<|endoftext|>` is bos and eos, `<|pad|>` pads (older tokenizers: `<|endoftext|>`);
  tokenizer class `PreTrainedTokenizerFast`, `model_max_length` = the model's context; the prompt
  convention is `tokenizer.PROMPT_CONVENTION`.

What the target architecture cannot express, we refuse to export (with the reason): e.g. a shared
expert outside Qwen2-MoE, ERNIE and GLM, a q/k norm other than its own, a router other than its
own, a child's expert width that does not divide ERNIE's or GLM's shared experts' width (their
configs state it as a count of experts), and per-layer heterogeneous expert counts, top-k or
widths (`layer_shapes`). The parent's `layer_order` (keep priority) has no transformers field; it
goes into the provenance.

Import is defensive: only safetensors, parsed without running anything from the folder.
Refused: pickle weight files (`.bin`, `.pt`, `.pth`, `.pkl`, ...) even beside safetensors, Python
files, `auto_map` (remote code), unknown model types or architectures, quantized weights, RoPE
scaling, sliding windows, attention biases outside Qwen2-MoE's and GLM's q/k/v, OLMoE's
`clip_qkv`, dense (non-MoE) layers outside ERNIE and GLM, ERNIE's `use_bias`, GLM's group-limited
top-k, a Qwen2-MoE without a shared expert, and safetensors headers whose keys or shapes differ
from what config.json implies (checked from the headers before any tensor is read or the model is
allocated). Imported weights keep the files' dtype (float32 where they mix dtypes); routers and
selection biases stored in float32 beside bf16 weights (ERNIE, GLM) stay float32.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import ConfigError, ModelConfig
from .model import ElasticMoE, rope_rows_to_pairs

log = logging.getLogger(__name__)

MIXTRAL, QWEN3_MOE, OLMOE, QWEN2_MOE = "mixtral", "qwen3_moe", "olmoe", "qwen2_moe"
ERNIE, GLM = "ernie4_5_moe", "glm4_moe"
ARCHITECTURES = {
    MIXTRAL: "MixtralForCausalLM",
    QWEN3_MOE: "Qwen3MoeForCausalLM",
    OLMOE: "OlmoeForCausalLM",
    QWEN2_MOE: "Qwen2MoeForCausalLM",
    ERNIE: "Ernie4_5_MoeForCausalLM",
    GLM: "Glm4MoeForCausalLM",
}
MODEL_TYPES = {cls: model_type for model_type, cls in ARCHITECTURES.items()}
# the scope of its q/k RMSNorm (GLM-4.5: per head when `use_qk_norm`, else none: either is fine)
QK_NORM_OF = {MIXTRAL: None, QWEN3_MOE: "head", OLMOE: "all", QWEN2_MOE: None, ERNIE: None, GLM: "head"}
QK_NORM_OPTIONAL = (GLM,)
QKV_BIAS_OF = (QWEN2_MOE, GLM)  # architectures with q/k/v biases (and none on o_proj)
SPECIAL_TOKEN = "<|endoftext|>"
# The one statement of how prompts are fed, quoted by the model cards and the lm-eval adapter.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

# The one table where our names meet transformers' names. Per layer: our key after `blocks.{i}.`
# -> transformers' key after `model.layers.{i}.`; experts follow below (`_expert_keys`).
LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "moe_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
}
QK_NORM_KEYS = {"attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"}
QKV_BIAS_KEYS = {f"attn.{n}_proj.bias": f"self_attn.{n}_proj.bias" for n in "qkv"}
SWIGLU = ("gate_proj", "up_proj", "down_proj")
SHARED_MODULE = {QWEN2_MOE: "mlp.shared_expert", ERNIE: "mlp.shared_experts", GLM: "mlp.shared_experts"}
DENSE_KEYS = {f"mlp.{n}.weight": f"mlp.{n}.weight" for n in SWIGLU}  # a dense layer's MLP (ERNIE, GLM)
# the router's selection bias and the shape it is stored in (ours: (E,))
ROUTER_BIAS_KEY = {
    ERNIE: ("mlp.moe_statics.e_score_correction_bias", (1, -1)),
    GLM: ("mlp.gate.e_score_correction_bias", (-1,)),
}
PAIR_ROPE = (ERNIE,)  # rotates adjacent q/k dims (2j, 2j+1): its rows are permuted on the way in and out
SHARED_GATE_KEYS = {"moe.shared_gate.weight": "mlp.shared_expert_gate.weight"}
GLOBAL_KEYS = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
HEAD_KEY = ("lm_head.weight", "lm_head.weight")
# MoE module prefix and per-expert (gate, up, down) names as `save_pretrained` writes them.
MOE_PREFIX = {MIXTRAL: "block_sparse_moe", QWEN3_MOE: "mlp", OLMOE: "mlp", QWEN2_MOE: "mlp", ERNIE: "mlp", GLM: "mlp"}
EXPERT_NAMES = {MIXTRAL: ("w1", "w3", "w2")}
EXPERT_NAMES.update({t: SWIGLU for t in (QWEN3_MOE, OLMOE, QWEN2_MOE, ERNIE, GLM)})
# Keys some older checkpoints carry that hold no weights (recomputed buffers).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


class HFError(ConfigError):
    """A model cannot be exported to, or a folder cannot be imported from, a stock architecture."""


# -- shared: which architecture, which keys ---------------------------------------------------
def architecture_for(config: ModelConfig) -> str:
    """model_type for `config`: its source architecture if it has one, else Mixtral or Qwen3-MoE by
    `qk_norm`; HFError saying why when that architecture cannot express it."""
    c = config
    if c.source_architecture and c.source_architecture not in MODEL_TYPES:
        raise HFError(
            f"source_architecture={c.source_architecture!r} is not one we export to; supported: {sorted(MODEL_TYPES)}"
        )
    model_type = MODEL_TYPES.get(c.source_architecture) or (QWEN3_MOE if c.qk_norm else MIXTRAL)
    problems = _inexpressible(c, model_type)
    if len(set(c.layer_shapes)) > 1:
        problems.append(
            f"per-layer shapes {[list(s) for s in c.layer_shapes]}: the stock config states one expert "
            "count, one top-k and one expert width for every layer; extract a uniform sub-network instead"
        )
    if problems:
        raise HFError(f"cannot export to {ARCHITECTURES[model_type]}: " + "; ".join(problems))
    return model_type


def _inexpressible(c: ModelConfig, model_type: str) -> list[str]:
    """What of `c` the architecture `model_type` has no field or module for (each silently lost)."""
    name, p = ARCHITECTURES[model_type], []
    ours, theirs = (c.qk_norm_scope if c.qk_norm else None), QK_NORM_OF[model_type]
    scope = {None: "no", "head": "a per-head", "all": "a whole-projection"}
    if ours != theirs and not (ours is None and model_type in QK_NORM_OPTIONAL):
        p.append(f"{name} has {scope[theirs]} q/k RMSNorm, this model {scope[ours]} one")
    if c.qkv_bias and model_type not in QKV_BIAS_OF:
        p.append(f"qkv_bias=true: {name} has no q/k/v biases")
    if model_type == QWEN2_MOE and not (c.shared_expert_width > 0 and c.shared_expert_gate):
        p.append(f"{name} needs a shared expert with its sigmoid gate (shared_expert_width > 0, shared_expert_gate)")
    if model_type not in SHARED_MODULE and c.shared_expert_width > 0:
        p.append(
            f"shared_expert_width={c.shared_expert_width}: {name} has no shared (always-on) expert, "
            "so its output would be silently lost"
        )
    if model_type in (MIXTRAL, ERNIE) and not c.renormalize_top_k:
        p.append(f"renormalize_top_k=false: {name} always renormalises the top-k probabilities")
    if model_type in (OLMOE, QWEN2_MOE) and c.heads * c.head_dim != c.d_model:
        p.append(f"heads * head_dim = {c.heads * c.head_dim} != d_model={c.d_model}: {name} derives head_dim")
    return p + _router_and_layout(c, model_type, name)


def _router_and_layout(c: ModelConfig, model_type: str, name: str) -> list[str]:
    """What of the ERNIE-4.5 / GLM-4.5 options (dense layers, router, shared experts, partial RoPE)
    the architecture cannot state."""
    p, glm = [], model_type == GLM
    if c.dense_layers and model_type not in (ERNIE, GLM):
        p.append(f"dense_layers={list(c.dense_layers)}: {name} has no dense (non-MoE) layers")
    if c.dense_layers and glm and c.dense_layers != tuple(range(len(c.dense_layers))):
        p.append(f"dense_layers={list(c.dense_layers)}: {name}'s dense layers are the first_k_dense_replace first")
    if model_type == ERNIE and ernie_moe_layers(c) is None:
        p.append(
            f"dense_layers={list(c.dense_layers)} of {c.layers} layers: {name} places MoE layers at every "
            "moe_layer_interval-th layer from moe_layer_start_index to moe_layer_end_index; this pattern is not one"
        )
    if c.router_bias and model_type not in ROUTER_BIAS_KEY:
        p.append(f"router_bias=true: {name}'s router has no selection bias")
    if c.renormalize_min > 0 and model_type != ERNIE:
        p.append(f"renormalize_min={c.renormalize_min}: {name} does not floor the top-k renormalisation")
    eps = 1e-20 if glm and c.renormalize_top_k else 0.0
    if c.renormalize_eps != eps:
        p.append(f"renormalize_eps={c.renormalize_eps}: {name} adds {eps:g} to the renormalisation's sum")
    if c.router_score != ("sigmoid" if glm else "softmax"):
        p.append(f"router_score={c.router_score!r}: {name}'s router is a {'sigmoid' if glm else 'softmax'}")
    if c.routed_scale != 1.0 and not glm:
        p.append(f"routed_scale={c.routed_scale}: {name} does not scale the routed experts' weights")
    if c.rope_dims and not glm:
        p.append(f"rope_dims={c.rope_dims}: {name} rotates the whole head")
    if c.rope_dims and glm and int(c.head_dim * (c.rope_dims / c.head_dim)) != c.rope_dims:
        p.append(f"rope_dims={c.rope_dims} of head_dim={c.head_dim}: not a partial_rotary_factor {name} reproduces")
    if model_type in (ERNIE, GLM):
        if c.shared_expert_gate:
            p.append(f"shared_expert_gate=true: {name}'s shared experts have no gate")
        if c.shared_expert_width % c.expert_width:
            p.append(
                f"shared_expert_width={c.shared_expert_width} is not a multiple of expert_width={c.expert_width}: "
                f"{name} states the shared experts' width as a number of experts x the expert width; "
                "keep an expert width that divides it"
            )
    return p


def ernie_moe_layers(c: ModelConfig) -> tuple[int, int, int] | None:
    """(moe_layer_start_index, moe_layer_end_index, moe_layer_interval) whose MoE layers are exactly
    the layers of `c` outside `dense_layers` (ERNIE-4.5: layer i is MoE iff (i + 1) % interval == 0
    and start <= i <= end), or None when no such triple exists."""
    moe = [i for i in range(c.layers) if not c.is_dense(i)]
    if not moe:
        return c.layers, c.layers - 1, 1
    start, end = moe[0], moe[-1]
    for interval in range(1, c.layers + 1):
        if [i for i in range(start, end + 1) if (i + 1) % interval == 0] == moe:
            return start, end, interval
    return None


def _expert_keys(model_type: str, layer: int, expert: int) -> tuple[str, str, str]:
    prefix = f"model.layers.{layer}.{MOE_PREFIX[model_type]}.experts.{expert}"
    return tuple(f"{prefix}.{name}.weight" for name in EXPERT_NAMES[model_type])  # type: ignore[return-value]


def layer_keys(config: ModelConfig, model_type: str, dense: bool = False) -> dict[str, str]:
    """Per-layer keys but the experts and the router bias: ours after `blocks.{i}.` -> transformers'
    after `model.layers.{i}.`, for an MoE layer or (`dense`) a dense one."""
    c, prefix = config, MOE_PREFIX[model_type]
    out = dict(LAYER_KEYS)
    out.update(QK_NORM_KEYS if c.qk_norm else {})
    out.update(QKV_BIAS_KEYS if c.qkv_bias else {})
    if dense:
        return {**out, **DENSE_KEYS}
    out["moe.router.weight"] = f"{prefix}.gate.weight"
    if c.shared_expert_width:
        shared = SHARED_MODULE.get(model_type, SHARED_MODULE[QWEN2_MOE])
        out.update({f"moe.shared.{n}.weight": f"{shared}.{n}.weight" for n in SWIGLU})
    out.update(SHARED_GATE_KEYS if c.shared_expert_gate else {})
    return out


def _hf_tensors(model: ElasticMoE, model_type: str) -> dict[str, torch.Tensor]:
    """Our tensors (views) under transformers' on-disk names, one entry per expert."""
    c = model.config
    ours = model.state_dict()
    out = {hf: ours[k] for k, hf in GLOBAL_KEYS.items()}
    if not c.tie_embeddings:
        out[HEAD_KEY[1]] = ours[HEAD_KEY[0]]
    for i in range(c.layers):
        per_layer = layer_keys(c, model_type, c.is_dense(i))
        layer = {hf: ours[f"blocks.{i}.{k}"] for k, hf in per_layer.items()}
        if model_type in PAIR_ROPE:
            layer["self_attn.q_proj.weight"] = rope_rows_to_pairs(layer["self_attn.q_proj.weight"], c.heads)
            layer["self_attn.k_proj.weight"] = rope_rows_to_pairs(layer["self_attn.k_proj.weight"], c.kv_heads)
        out.update({f"model.layers.{i}.{hf}": t for hf, t in layer.items()})
        if c.is_dense(i):
            continue
        if model_type in ROUTER_BIAS_KEY:  # zeros for a model without one: the same routing
            bias = ours.get(f"blocks.{i}.moe.router_bias")
            bias = bias if bias is not None else ours[f"blocks.{i}.moe.router.weight"].new_zeros(c.layer_shape(i)[0])
            key, shape = ROUTER_BIAS_KEY[model_type]
            out[f"model.layers.{i}.{key}"] = bias.float().reshape(shape)
        w_gate, w_up, w_down = (ours[f"blocks.{i}.moe.{n}"] for n in ("w_gate", "w_up", "w_down"))
        for e in range(w_gate.shape[0]):
            gate, up, down = _expert_keys(model_type, i, e)
            out.update({gate: w_gate[e], up: w_up[e], down: w_down[e]})
    return out


def expected_shapes(config: ModelConfig, model_type: str) -> dict[str, tuple[int, ...]]:
    """Every transformers key (on-disk names, as `save_pretrained` writes them) and its shape,
    read off our model built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = ElasticMoE(config)
    return {k: tuple(v.shape) for k, v in _hf_tensors(model, model_type).items()}


# -- export -----------------------------------------------------------------------------------
def hf_state_dict(model: ElasticMoE, model_type: str) -> dict[str, torch.Tensor]:
    """Our tensors under transformers' on-disk names (contiguous copies, one per expert)."""
    # Clones: safetensors refuses tensors that share storage (expert slices of one stacked tensor).
    tensors = _hf_tensors(model, model_type)
    return {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _transformers_version() -> str:
    """The installed transformers' version (without importing it), else the oldest 5.x we support."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "5.0.0"


def hf_config(
    config: ModelConfig,
    model_type: str,
    dtype: torch.dtype = torch.float32,
    token_id: int | None = None,
    provenance: dict[str, Any] | None = None,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """config.json for `config` as a stock `model_type` (see the module docstring's conventions).

    `token_id` is bos and eos (`<|endoftext|>`), `pad_id` the pad (default: `token_id`).
    """
    c = config
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rope_theta)},
        "rope_theta": float(c.rope_theta),  # transformers 4.x reads only this
        "tie_word_embeddings": c.tie_embeddings,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_experts_per_tok": c.top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": token_id,
        "eos_token_id": token_id,
        "pad_token_id": token_id if pad_id is None else pad_id,
        "dtype": _dtype_name(dtype),
        "torch_dtype": _dtype_name(dtype),  # transformers 4.x's name for `dtype`
        "transformers_version": _transformers_version(),
    }
    if model_type == MIXTRAL:
        out.update(intermediate_size=c.expert_width, num_local_experts=c.experts, router_jitter_noise=0.0)
    elif model_type == GLM:
        out["rope_parameters"]["partial_rotary_factor"] = c.rotary_dims / c.head_dim
        out.update(
            moe_intermediate_size=c.expert_width,
            intermediate_size=c.dense_width or c.expert_width,  # the dense layers' width; unused without one
            n_routed_experts=c.experts,
            n_shared_experts=c.shared_expert_width // c.expert_width,
            first_k_dense_replace=len(c.dense_layers),
            routed_scaling_factor=c.routed_scale,
            n_group=1,
            topk_group=1,
            norm_topk_prob=c.renormalize_top_k,
            use_qk_norm=c.qk_norm,
            attention_bias=c.qkv_bias,
            num_nextn_predict_layers=0,  # no multi-token-prediction layer
        )
    elif model_type == ERNIE:
        start, end, interval = ernie_moe_layers(c)
        del out["num_experts_per_tok"]  # ERNIE's name is moe_k (attribute_map); one name, no conflict
        out.update(
            moe_intermediate_size=c.expert_width,
            intermediate_size=c.dense_width or c.expert_width,  # the dense layers' width; unused without one
            moe_num_experts=c.experts,
            moe_k=c.top_k,
            moe_num_shared_experts=c.shared_expert_width // c.expert_width,
            moe_layer_start_index=start,
            moe_layer_end_index=end,
            moe_layer_interval=interval,
            moe_norm_min=c.renormalize_min,
            use_bias=False,
        )
    elif model_type == OLMOE:
        out.update(
            intermediate_size=c.expert_width,
            num_experts=c.experts,
            norm_topk_prob=c.renormalize_top_k,
            attention_bias=False,
            clip_qkv=None,
        )
    else:
        out.update(
            moe_intermediate_size=c.expert_width,
            intermediate_size=c.expert_width,  # dense-MLP width; unused with no dense layers
            num_experts=c.experts,
            norm_topk_prob=c.renormalize_top_k,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=False,
        )
        if model_type == QWEN3_MOE:
            out.update(attention_bias=False)
        else:
            out.update(
                shared_expert_intermediate_size=c.shared_expert_width,
                qkv_bias=c.qkv_bias,
                max_window_layers=c.layers,
                layer_types=["full_attention"] * c.layers,
            )
    if provenance:
        out["elasticmoe_provenance"] = provenance
    return out


def _write_tokenizer(tokenizer_json: Path, folder: Path, max_len: int) -> tuple[int, int]:
    """Tokenizer files for transformers in `folder` (`Tokenizer.export`); return (bos/eos id, pad id)."""
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_json)
    tokenizer.export(folder, model_max_length=max_len)
    return tokenizer.eos_id, tokenizer.pad_id


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data, default=str))


def export_source(model_dir_or_model, tokenizer_path=None) -> tuple[ElasticMoE, dict[str, Any], Path | None]:
    """What every export starts from: the model, the meta of its folder (with `source`) and its
    tokenizer.json when `tokenizer_path` is not given and the folder has one."""
    if isinstance(model_dir_or_model, ElasticMoE):
        return model_dir_or_model, {}, tokenizer_path
    source = Path(model_dir_or_model)
    model, meta = checkpoint.load_model(source)
    if tokenizer_path is None and (source / "tokenizer.json").is_file():
        tokenizer_path = source / "tokenizer.json"
    return model, {"source": str(source), **meta}, tokenizer_path


# transformers runs MoE experts with a grouped GEMM that needs 16-byte strides
KERNEL_STRIDE_BYTES = 16


def pad_expert_width(model: ElasticMoE, multiple: int | None = None) -> tuple[ElasticMoE, int | None]:
    """The same function with the experts' hidden width rounded up to a multiple of `multiple` (by
    default 16 bytes of the model's dtype: 4 float32 units, 8 bfloat16) by zero units (zero gate and
    up rows, zero down columns: silu(0) * 0 adds nothing), so that transformers' grouped-GEMM kernel
    can run it (a float32 child of width 2, 5 or 6 otherwise fails there with "strides should be
    multiple of 16 bytes"). Returns (model, None) when nothing needs it, else (a padded copy, the
    original width). Widths must be one for every MoE layer."""
    c = model.config
    multiple = multiple or max(1, KERNEL_STRIDE_BYTES // model.embed.weight.element_size())
    widths = {c.layer_shape(i)[2] for i in range(c.layers) if not c.is_dense(i)}
    if len(widths) != 1 or next(iter(widths)) % multiple == 0:
        return model, None
    (width,) = widths
    padded_width = -(-width // multiple) * multiple
    config = dataclasses.replace(
        c, expert_width=padded_width, layer_shapes=tuple((e, k, padded_width) for e, k, _ in c.layer_shapes)
    )
    weight = model.embed.weight
    padded = ElasticMoE(config).to(device=weight.device, dtype=weight.dtype)
    source = model.state_dict()
    state = {}
    for name, target in padded.state_dict().items():
        tensor = source[name]
        if tensor.shape != target.shape:  # an expert tensor: the kept units first, zeros after them
            grown = torch.zeros_like(target)
            grown[tuple(slice(0, n) for n in tensor.shape)] = tensor
            tensor = grown
        state[name] = tensor
    padded.load_state_dict(state)
    padded.layer_order = list(model.layer_order)
    return padded.train(model.training), width


def export_hf(
    model_dir_or_model: ElasticMoE | str | Path,
    out_dir: str | Path,
    tokenizer_path: str | Path | None = None,
    provenance: dict[str, Any] | None = None,
    verify_tokens: torch.Tensor | None = None,
    tolerance: float = 1e-4,
    verify: bool = True,
) -> dict[str, Any]:
    """Write a stock transformers folder (weights, config, generation config, tokenizer, model card).

    `model_dir_or_model`: a model folder (its meta, e.g. a child's extraction record, joins the
    provenance, and its tokenizer.json is used when `tokenizer_path` is not given) or a model.
    Before the folder is put in place it is loaded with transformers and refused (nothing written)
    unless its logits match ours to `tolerance` on `verify_tokens` (B, T), or, when none are given
    (a folder outside a run), on random token ids: the record says which (`hf_verification.tokens`).
    `verify=False` skips the check (and the record says so). Returns the provenance.
    """
    original, meta, tokenizer_path = export_source(model_dir_or_model, tokenizer_path)
    model_type = architecture_for(original.config)
    model, padded_from = pad_expert_width(original)
    dtype = model.embed.weight.dtype
    record = _jsonable(
        {
            **meta,
            **(provenance or {}),
            "architecture": ARCHITECTURES[model_type],
            "elasticmoe_config": model.config.to_dict(),
            "layer_order": list(model.layer_order),
        }
    )
    if padded_from is not None:
        record["expert_width_padded"] = {
            "width": padded_from,
            "exported": model.config.expert_width,
            "why": f"transformers' grouped-GEMM expert kernel needs rows of {KERNEL_STRIDE_BYTES}-byte "
            "multiples; the added units are zero and change no logit",
        }
    from .model_card import model_card, model_name, portable

    record.setdefault("name", model_name(record, out_dir))
    record["out"] = str(out_dir)
    if verify and importlib.util.find_spec("transformers") is None:
        raise HFError("checking an export loads it in transformers: pip install 'elasticmoe[hf]' (or verify=False)")
    tokens_note = "token ids given by the caller (held-out ones of the run from `elasticmoe export`)"
    if verify and verify_tokens is None:
        length = min(64, model.config.max_seq_len)
        verify_tokens = torch.randint(
            0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0)
        )
        tokens_note = "random token ids (no run folder to take held-out tokens from)"
        log.warning("no held-out tokens for %s: checking the export against random token ids", out_dir)
    with checkpoint.AtomicFolder(out_dir) as tmp:
        checkpoint.save_tensors(hf_state_dict(model, model_type), tmp / "model.safetensors", metadata={"format": "pt"})
        token_id = pad_id = None
        if tokenizer_path is not None:
            token_id, pad_id = _write_tokenizer(Path(tokenizer_path), tmp, model.config.max_seq_len)
        generation = {"bos_token_id": token_id, "eos_token_id": token_id, "pad_token_id": pad_id}
        checkpoint.write_json(tmp / "generation_config.json", generation)
        checkpoint.write_json(
            tmp / "config.json", hf_config(model.config, model_type, dtype, token_id, portable(record), pad_id)
        )
        if verify:
            # against the model as it was (unpadded): the check covers the padding too
            record["hf_verification"] = {
                **_verify_folder(original, tmp, verify_tokens, tolerance),
                "tokens": tokens_note,
            }
        else:
            record["hf_verification"] = {"skipped": "verify=False"}
        checkpoint.write_json(
            tmp / "config.json", hf_config(model.config, model_type, dtype, token_id, portable(record), pad_id)
        )
        (tmp / "README.md").write_text(
            model_card(model, record, model_type, ARCHITECTURES[model_type]), encoding="utf-8"
        )
    log.info("exported %s to %s", ARCHITECTURES[model_type], out_dir)
    return record


@torch.no_grad()
def max_logit_diff_hf(model: ElasticMoE, hf_model, tokens: torch.Tensor) -> float:
    """Max abs difference (float32) between our logits and a transformers model's on `tokens` (B, T)."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens[None]
    ours = model(tokens.to(model.embed.weight.device)).logits.float().cpu()
    theirs = hf_model(input_ids=tokens.to(hf_model.device)).logits.float().cpu()
    return (ours - theirs).abs().max().item()


def _verify_folder(model: ElasticMoE, folder: Path, tokens: torch.Tensor, tolerance: float) -> dict[str, Any]:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a bar per load clutters pipeline logs
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    hf_model.eval()
    if model.embed.weight.dtype != torch.float32:  # compare in float32 without touching the caller's model
        model = copy.deepcopy(model).float()
    diff = max_logit_diff_hf(model, hf_model, tokens)
    if not diff <= tolerance:
        raise HFError(
            f"exported folder does not reproduce the model: max abs logit difference {diff:.3g} "
            f"exceeds {tolerance:g}; nothing written"
        )
    return {
        "max_abs_logit_diff": diff,
        "tokens_verified": int(torch.as_tensor(tokens).numel()),
        "tolerance": tolerance,
        "transformers_version": transformers.__version__,
    }


__all__ = [
    "ARCHITECTURES",
    "MODEL_TYPES",
    "HFError",
    "architecture_for",
    "expected_shapes",
    "export_hf",
    "hf_config",
    "hf_state_dict",
    "max_logit_diff_hf",
]
