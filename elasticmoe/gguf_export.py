"""GGUF export for llama.cpp, written with llama.cpp's own `gguf` Python package, and its check.

Architecture mapping (the same math as `hf`, under llama.cpp's names):

* `qk_norm=False` (Mixtral math) -> llama.cpp arch `llama` with experts (how llama.cpp runs
  Mixtral). llama.cpp's `llama` arch applies RoPE to adjacent pairs (GPT-J style) while we rotate
  halves (GPT-NeoX style), so the rows of q_proj and k_proj are permuted within each head
  (row `j * head_dim/2 + i` of a head moves to `2 i + j`): the dot products of queries and keys,
  hence the logits, are unchanged (llama.cpp's own HF converter does the same for Llama/Mixtral);
* `qk_norm=True` (Qwen3-MoE math) -> arch `qwen3moe`, which rotates halves: no permutation;
* `Qwen2MoeForCausalLM` -> arch `qwen2moe` (rotates halves): the shared expert as
  `ffn_{gate,up,down}_shexp`, its sigmoid gate as the vector `ffn_gate_inp_shexp` (ours is a
  (1, D) linear), the q/k/v biases as `attn_{q,k,v}.bias`, `expert_shared_feed_forward_length`;
* `OlmoeForCausalLM` -> arch `olmoe` (rotates halves): the whole-projection q/k RMSNorm as
  `attn_{q,k}_norm`; llama.cpp sizes `attn_k_norm` as d_model, so only kv_heads = heads loads;
* `Ernie4_5_MoeForCausalLM` -> arch `ernie4_5-moe`, adjacent-pair RoPE like `llama` (rows
  permuted the same way): dense layers as `ffn_{gate,up,down}` (`feed_forward_length` =
  `dense_width`), placed by `leading_dense_block_count` and `interleave_moe_layer_step` (layer i
  is MoE iff i >= lead and (i + 1) % step == 0: no end index, so MoE layers must run to the last
  layer), the ungated shared experts as `ffn_*_shexp` of `expert_shared_feed_forward_length`, the
  selection bias as `exp_probs_b.bias` (zeros for a model without one);
* `Glm4MoeForCausalLM` -> arch `glm4moe` (rotates halves of the first `rope_dimension_count` =
  `rope_dims` dims of each head, as we do): ERNIE's tensors, with the FFN pre-norm named
  `post_attention_norm`, the first `leading_dense_block_count` layers dense, `expert_gating_func`
  sigmoid, `expert_weights_norm` = `renormalize_top_k`, `expert_weights_scale` = `routed_scale`,
  `expert_shared_count`, `nextn_predict_layers` 0, optional per-head q/k norm, q/k/v biases.

All route like us: softmax over the experts (GLM: a sigmoid per expert), top-k (ERNIE, GLM: of
the scores plus `exp_probs_b`); `llama`, `qwen3moe` and `ernie4_5-moe` renormalise the k weights
to one, `qwen2moe` and `olmoe` use them as they are (the `norm_w` of their graphs, which no GGUF
key changes), so `renormalize_top_k` must match the arch (`LLAMA_ARCH`); `glm4moe` reads it from
`expert_weights_norm`. llama.cpp floors the renormalisation's sum at 2^-14, ERNIE at
`moe_norm_min`: the same weights while both floors are at most top_k / experts (the least a
softmax top-k sum can be). GLM adds 1e-20 instead: the two differ only for a token whose k chosen
sigmoid scores sum below 2^-14 (every router logit below about -10), which no config rules out;
the float check would see it on the tokens it runs. Refused with one line naming `--format hf`:
a renormalisation other than the arch's (e.g. a Qwen2-MoE with `norm_topk_prob: true`), OLMoE
with grouped-query attention, an ERNIE layer pattern or floor llama.cpp does not compute, a GLM
without shared experts. The float check catches a slip in this mapping: tests/test_gguf.py shows
it refusing a file whose router renormalises differently from ours, lacks the selection bias or
the routed scale, or leaves the shared expert ungated.

Tensor names come from the `gguf` package (`TENSOR_NAMES`), never spelled here; stacked experts
go in as llama.cpp's merged `ffn_{gate,up,down}_exps` tensors, our (E, W, D) / (E, D, W) layout
being exactly theirs.

Tensor types (`qtype`): `f32` (every tensor float32, reproduces our logits to ~1e-5), `f16`
(matrices in float16), `q8_0` (matrices llama.cpp can quantise in blocks of 32 along a row in
Q8_0, others float16). Norms, biases, the router, the selection bias and Qwen2-MoE's
shared-expert gate stay float32 in every type, as llama.cpp's converter keeps them.

Tokenizer: `tokenizer.ggml.model = gpt2` (byte-level BPE) with our vocabulary and merges, and
pre-tokenizer type `refact`: llama.cpp splits every digit alone and then applies the GPT-2
regex, which is exactly our pipeline (`tokenizers`' `Digits(individual_digits=True)` then the
GPT-2 byte-level regex). `verify_gguf` checks it on text: identical ids or the export fails.

Prompt convention (see `tokenizer.PROMPT_CONVENTION`): every sequence starts with `<|endoftext|>`,
which is BOS; the GGUF says `add_bos_token = true`, so llama.cpp prepends it like our eval does.

Verification (`verify_gguf`) runs the written file in llama.cpp, the library inside the prebuilt
`xllamacpp` wheel (no compiler needed; `llama-cpp-python` builds llama.cpp from source, about 15
minutes on 2 cores), called through llama.h with ctypes: its token ids on sample text against
ours, its logits at every position against ours, and greedy continuations token for token.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint
from .config import ConfigError, ModelConfig
from .hf import (
    ARCHITECTURES,
    ERNIE,
    GLM,
    MIXTRAL,
    OLMOE,
    QWEN2_MOE,
    QWEN3_MOE,
    HFError,
    architecture_for,
    export_source,
)
from .model import ElasticMoE, rope_rows_to_pairs

log = logging.getLogger(__name__)

QTYPES = ("f32", "f16", "q8_0")
# Max |logit difference| llama.cpp vs elasticmoe running the weights as the file stores them
# (`as_stored`: rounded to f16 / q8_0 exactly as written), relative to max(1, max |logit|), per
# tensor type, above which the export is refused. What remains is llama.cpp's own arithmetic: its
# KV cache in float16 (about 2e-4 on logits of order 1 even for f32 weights), and for q8_0 its
# activations rounded to 8 bits in every quantised matmul. Rounding the weights alone moves the
# logits of unlikely tokens of a trained model by more than that (it is what quantisation does,
# reported as `quantisation_logit_shift`), so it is not held against the file.
TOLERANCE = {"f32": 2e-3, "f16": 1e-2, "q8_0": 5e-2}
# q8_0 also passes on its next-token distributions when its logits do not: llama.cpp's q8_0
# matmuls round their activations to 8 bits, and in an MoE a router choice near a tie then flips
# for a few tokens, which moves those positions' logits wholesale (a trained tiny child of the
# default run: max logit difference 3.9 at one position of 256, mean KL 0.0013 nats, top-1 token
# the same at 98.8% of positions). Accepted when the mean over positions of KL(ours || llama.cpp)
# is at most Q8_KL nats and the top-1 token agrees at Q8_TOP1 of the positions or more; a wrong
# file (another model's weights, a transposed tensor) gives KL of order 1 and chance agreement.
Q8_KL, Q8_TOP1 = 0.01, 0.95
PRE_TOKENIZER = "refact"  # llama.cpp: "\p{N}" alone, then the GPT-2 regex = our Digits + ByteLevel
GGUF_FILE = "model-{qtype}.gguf"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the `gguf` package: pip install 'elasticmoe[gguf]'") from None
    return gguf


# transformers model_type -> llama.cpp arch, and whether that arch's graph renormalises the top-k
# weights (the `norm_w` argument of its `build_moe_ffn` call: true for llama and qwen3moe, false
# for qwen2moe and olmoe, with no GGUF key to change it), which our `renormalize_top_k` must equal.
LLAMA_ARCH = {
    MIXTRAL: ("llama", True),
    QWEN3_MOE: ("qwen3moe", True),
    QWEN2_MOE: ("qwen2moe", False),
    OLMOE: ("olmoe", False),
    ERNIE: ("ernie4_5-moe", True),
    GLM: ("glm4moe", None),  # `expert_weights_norm` states it
}
PAIR_ROPE_ARCHS = ("llama", "ernie4_5-moe")  # rotate adjacent pairs: q/k rows permuted per head
# build_moe_ffn floors the sum of the renormalised top-k weights at this (2^-14, ggml's clamp)
LLAMA_RENORMALIZE_MIN = 6.103515625e-5


def _llama_arch(config: ModelConfig) -> str:
    """llama.cpp's arch for `config`; HFError (one line) for what no llama.cpp arch this writer
    covers expresses (a top-k renormalisation other than the arch's, OLMoE with grouped-query
    attention, ERNIE layouts and floors llama.cpp does not compute, GLM without shared experts),
    which `--format hf` exports."""
    c, model_type = config, architecture_for(config)
    arch, renormalises = LLAMA_ARCH.get(model_type, (None, None))
    problem = None
    if arch is None:
        problem = f"this model is {ARCHITECTURES[model_type]}"
    elif renormalises is not None and c.renormalize_top_k != renormalises:
        problem = (
            f"llama.cpp's {arch} {'always' if renormalises else 'never'} renormalises the top-k weights, "
            f"this {ARCHITECTURES[model_type]} has renormalize_top_k={c.renormalize_top_k}"
        )
    elif arch == "ernie4_5-moe":
        problem = _ernie_problem(c)
    elif arch == "glm4moe" and not c.shared_expert_width:
        problem = "llama.cpp's glm4moe graph always adds shared experts (it runs wrong without), this model has none"
    elif arch == "olmoe" and c.kv_heads != c.heads:
        problem = f"llama.cpp's olmoe sizes attn_k_norm for kv_heads = heads, this model has {c.kv_heads} of {c.heads}"
    if problem:
        covered = ", ".join(f"{ARCHITECTURES[t]} ({a})" for t, (a, _) in LLAMA_ARCH.items())
        raise HFError(f"GGUF export covers {covered}; {problem}: use --format hf")
    return arch


def ernie_layout(c: ModelConfig) -> tuple[int, int] | None:
    """(leading_dense_block_count, interleave_moe_layer_step) of llama.cpp's ernie4_5-moe, whose layer
    i is MoE iff i >= lead and (i + 1) % step == 0, giving exactly the MoE layers of `c`; or None."""
    moe = [i for i in range(c.layers) if not c.is_dense(i)]
    lead = moe[0] if moe else c.layers
    for step in range(1, c.layers + 1):
        if [i for i in range(lead, c.layers) if (i + 1) % step == 0] == moe:
            return lead, step
    return None


def _ernie_problem(c: ModelConfig) -> str | None:
    """What of an ERNIE-4.5-MoE config llama.cpp's ernie4_5-moe cannot compute, or None."""
    if ernie_layout(c) is None:
        return (
            f"llama.cpp's ernie4_5-moe has MoE layers every interleave_moe_layer_step-th layer from "
            f"leading_dense_block_count to the last, this model's dense_layers={list(c.dense_layers)} of "
            f"{c.layers} layers are not that pattern (moe_layer_end_index before the last layer)"
        )
    # the sum of the top-k softmax weights is at least top_k / experts: below it neither floor acts
    if max(c.renormalize_min, LLAMA_RENORMALIZE_MIN) > c.top_k / c.experts:
        return (
            f"llama.cpp floors the top-k weights' sum at {LLAMA_RENORMALIZE_MIN:g}, this model at "
            f"renormalize_min={c.renormalize_min:g}: with top_k/experts = {c.top_k / c.experts:g} the floors can act"
        )
    return None


def _layer_names(c: ModelConfig, arch: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(MoE layer, dense layer) maps: our key after `blocks.{i}.` -> llama.cpp's MODEL_TENSOR."""
    T = _gguf().MODEL_TENSOR
    moe = {
        "attn_norm.weight": T.ATTN_NORM,
        "moe_norm.weight": T.FFN_NORM,
        "attn.q_proj.weight": T.ATTN_Q,
        "attn.k_proj.weight": T.ATTN_K,
        "attn.v_proj.weight": T.ATTN_V,
        "attn.o_proj.weight": T.ATTN_OUT,
        "moe.router.weight": T.FFN_GATE_INP,
        "moe.w_gate": T.FFN_GATE_EXP,
        "moe.w_up": T.FFN_UP_EXP,
        "moe.w_down": T.FFN_DOWN_EXP,
    }
    if c.qk_norm:  # per head (qwen3moe) or over the whole projection (olmoe): the same names
        moe.update({"attn.q_norm.weight": T.ATTN_Q_NORM, "attn.k_norm.weight": T.ATTN_K_NORM})
    if c.qkv_bias:
        moe.update({"attn.q_proj.bias": T.ATTN_Q, "attn.k_proj.bias": T.ATTN_K, "attn.v_proj.bias": T.ATTN_V})
    if c.shared_expert_width:
        shared = {"gate_proj": T.FFN_GATE_SHEXP, "up_proj": T.FFN_UP_SHEXP, "down_proj": T.FFN_DOWN_SHEXP}
        moe.update({f"moe.shared.{n}.weight": t for n, t in shared.items()})
    if c.shared_expert_gate:  # llama.cpp's is one vector (n_embd), ours a (1, D) linear
        moe["moe.shared_gate.weight"] = T.FFN_GATE_INP_SHEXP
    if arch in ("ernie4_5-moe", "glm4moe"):  # the selection bias (a `.bias`)
        moe["moe.router_bias"] = T.FFN_EXP_PROBS_B
    if arch == "glm4moe":  # its FFN's pre-norm is named post_attention_norm
        moe["moe_norm.weight"] = T.ATTN_POST_NORM
    dense = {k: t for k, t in moe.items() if not k.startswith("moe.")}
    dense.update(
        {"mlp.gate_proj.weight": T.FFN_GATE, "mlp.up_proj.weight": T.FFN_UP, "mlp.down_proj.weight": T.FFN_DOWN}
    )
    return moe, dense


def gguf_tensors(model: ElasticMoE) -> dict[str, torch.Tensor]:
    """Our tensors under llama.cpp's GGUF names (float32, contiguous), q/k rows permuted for the
    pair-RoPE archs (`llama`, `ernie4_5-moe`)."""
    gguf = _gguf()
    T, N = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    c = model.config
    arch = _llama_arch(c)
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {N[T.TOKEN_EMBD]: ours["embed.weight"], N[T.OUTPUT_NORM]: ours["norm.weight"]}
    if not c.tie_embeddings:  # llama.cpp falls back to token_embd when `output` is absent
        out[N[T.OUTPUT]] = ours["lm_head.weight"]
    out = {f"{k}.weight": v for k, v in out.items()}
    moe, dense = _layer_names(c, arch)
    for i in range(c.layers):
        if "moe.router_bias" in moe and not c.is_dense(i):  # zeros for a model without one: the same routing
            ours.setdefault(f"blocks.{i}.moe.router_bias", torch.zeros(c.layer_shape(i)[0]))
        for ours_key, tensor in (dense if c.is_dense(i) else moe).items():
            w = ours[f"blocks.{i}.{ours_key}"]
            if arch in PAIR_ROPE_ARCHS and ours_key == "attn.q_proj.weight":
                w = rope_rows_to_pairs(w, c.heads)
            elif arch in PAIR_ROPE_ARCHS and ours_key == "attn.k_proj.weight":
                w = rope_rows_to_pairs(w, c.kv_heads)
            elif ours_key == "moe.shared_gate.weight":
                w = w.reshape(-1)
            suffix = "bias" if ours_key.endswith("bias") else "weight"
            out[f"{N[tensor].format(bid=i)}.{suffix}"] = w
    return {k: v.contiguous() for k, v in out.items()}


def _tensor_type(name: str, array: np.ndarray, qtype: str):
    """GGML type of one tensor: 1-D tensors and the router stay float32 (as llama.cpp's converter)."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if qtype == "f32" or array.ndim == 1 or ".ffn_gate_inp." in name:
        return Q.F32
    if qtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


def as_stored(model: ElasticMoE, qtype: str) -> ElasticMoE:
    """A float32 copy of `model` whose weights are rounded exactly as `write_gguf` stores them for
    `qtype` (the same `_tensor_type` choice per tensor, gguf's own quantise + dequantise): what
    llama.cpp should reproduce. Rounding is per row (q8_0 blocks run along the last dimension), so
    llama's q/k row permutation does not change it."""
    import copy

    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    stored = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for name, param in stored.named_parameters():
            array = param.detach().cpu().numpy()
            # the router and the shared expert's gate (a vector in the file) stay float32 there
            kept = name.endswith(("router.weight", "shared_gate.weight"))
            kind = _tensor_type(".ffn_gate_inp." if kept else name, array, qtype)
            if kind == Q.F16:
                param.copy_(torch.from_numpy(array.astype(np.float16).astype(np.float32)))
            elif kind != Q.F32:
                rounded = gguf.quants.dequantize(gguf.quants.quantize(array, kind), kind)
                param.copy_(torch.from_numpy(np.ascontiguousarray(rounded, dtype=np.float32).reshape(array.shape)))
    return stored


def tokenizer_fields(tokenizer_json: Path, vocab_size: int) -> dict[str, Any]:
    """Tokens (byte-level strings), token types, merges and special ids for a `gpt2` GGUF tokenizer.

    Ids the tokenizer does not use up to the model's `vocab_size` become unused placeholders
    (llama.cpp needs one entry per embedding row).
    """
    from .tokenizer import EOS_TOKEN, PAD_TOKEN

    gguf = _gguf()
    data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise HFError(f"{tokenizer_json}: GGUF export supports the byte-level BPE tokenizers elasticmoe trains")
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    special = {int(t["id"]): t["content"] for t in data.get("added_tokens") or [] if t.get("special")}
    by_id.update(special)
    if max(by_id) >= vocab_size:
        raise HFError(f"tokenizer has id {max(by_id)} but the model has only {vocab_size} embedding rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in special:
            tokens.append(special[i])
            types.append(gguf.TokenType.CONTROL)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[UNUSED{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    ids = {v: k for k, v in special.items()}
    if EOS_TOKEN not in ids:
        raise HFError(f"{tokenizer_json} has no special {EOS_TOKEN} token (bos/eos of the export)")
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "eos": ids[EOS_TOKEN],
        "pad": ids.get(PAD_TOKEN, ids[EOS_TOKEN]),
    }


def write_gguf(
    model: ElasticMoE,
    path: Path,
    tokenizer_json: Path,
    qtype: str = "f32",
    name: str = "elasticmoe",
    pre_tokenizer: str = PRE_TOKENIZER,
) -> dict[str, Any]:
    """Write `model` (+ tokenizer) as one GGUF file at `path`; return {tensor name: ggml type name}."""
    gguf = _gguf()
    if qtype not in QTYPES:
        raise ConfigError(f"GGUF type {qtype!r} is not supported; choose one of {list(QTYPES)}")
    c: ModelConfig = model.config
    arch = _llama_arch(c)
    tok = tokenizer_fields(tokenizer_json, c.vocab_size)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[qtype]
    )
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.layers)
    w.add_feed_forward_length(c.dense_width or c.expert_width)  # dense layers' width (ERNIE), else unused
    w.add_expert_feed_forward_length(c.expert_width)
    if arch == "ernie4_5-moe":
        lead, step = ernie_layout(c)
        w.add_leading_dense_block_count(lead)
        w.add_interleave_moe_layer_step(step)
    if arch == "glm4moe":
        w.add_leading_dense_block_count(len(c.dense_layers))
        w.add_expert_shared_count(c.shared_expert_width // c.expert_width)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_norm(c.renormalize_top_k)
        w.add_expert_weights_scale(float(c.routed_scale))
        w.add_nextn_predict_layers(0)
    if c.shared_expert_width:
        w.add_expert_shared_feed_forward_length(c.shared_expert_width)
    w.add_head_count(c.heads)
    w.add_head_count_kv(c.kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.rotary_dims)  # partial RoPE: GLM-4.5 only
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.norm_eps))
    w.add_expert_count(c.experts)
    w.add_expert_used_count(c.top_k)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer)
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["eos"])
    w.add_eos_token_id(tok["eos"])
    w.add_pad_token_id(tok["pad"])
    w.add_add_bos_token(True)  # the prompt convention: <|endoftext|> first, as our eval feeds it
    w.add_add_eos_token(False)
    types = {}
    for tname, tensor in gguf_tensors(model).items():
        array = tensor.numpy()
        ggml_type = _tensor_type(tname, array, qtype)
        if ggml_type == gguf.GGMLQuantizationType.F16:
            array = array.astype(np.float16)
        elif ggml_type != gguf.GGMLQuantizationType.F32:
            array = gguf.quants.quantize(array, ggml_type)
        w.add_tensor(tname, array, raw_dtype=ggml_type)
        types[tname] = ggml_type.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


# -- running the file in llama.cpp ----------------------------------------------------------------
class _Batch(ctypes.Structure):
    """`llama_batch` of llama.h (unchanged since 2023)."""

    _fields_ = [
        ("n_tokens", ctypes.c_int32),
        ("token", ctypes.POINTER(ctypes.c_int32)),
        ("embd", ctypes.POINTER(ctypes.c_float)),
        ("pos", ctypes.POINTER(ctypes.c_int32)),
        ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
        ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
        ("logits", ctypes.POINTER(ctypes.c_int8)),
    ]


class _Params(ctypes.Structure):
    """Room for `llama_model_params` / `llama_context_params`, passed back as llama.cpp filled them.

    Both are larger than 16 bytes, so the x86-64 and AArch64 ABIs return and pass them through
    memory: a buffer larger than the real struct is safe. Only the leading uint32 fields of the
    context parameters are set, in the order of the llama.h of the pinned `xllamacpp`: n_ctx,
    n_batch, n_ubatch, n_seq_max, n_rs_seq, n_outputs_max, n_outputs_max_per_seq, n_threads,
    n_threads_batch (`LlamaCpp` checks llama.cpp's defaults against that order before using it).
    """

    _fields_ = [("head", ctypes.c_uint32 * 9), ("rest", ctypes.c_uint8 * 1000)]


def llama_library() -> Path:
    """The llama.cpp shared library: $ELASTICMOE_LLAMA_LIB, else the one in the `xllamacpp` wheel
    (a prebuilt llama.cpp, glibc 2.17+, that exports the whole C API)."""
    env = os.environ.get("ELASTICMOE_LLAMA_LIB")
    if env:
        return Path(env)
    for module, pattern in (("xllamacpp", "xllamacpp*.so"),):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            found = sorted(Path(next(iter(spec.submodule_search_locations))).glob(pattern))
            if found:
                return found[0]
    raise ConfigError(
        "running a GGUF needs llama.cpp: pip install 'elasticmoe[gguf]' (the prebuilt `xllamacpp` wheel) "
        "or set ELASTICMOE_LLAMA_LIB to a libllama.so"
    )


_LIB: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is not None:
        return _LIB
    lib = ctypes.CDLL(str(llama_library()))
    vp, i32, b = ctypes.c_void_p, ctypes.c_int32, ctypes.c_bool
    signatures = {
        "llama_backend_init": (None, []),
        "llama_model_default_params": (_Params, []),
        "llama_context_default_params": (_Params, []),
        "llama_model_load_from_file": (vp, [ctypes.c_char_p, _Params]),
        "llama_init_from_model": (vp, [vp, _Params]),
        "llama_model_get_vocab": (vp, [vp]),
        "llama_vocab_n_tokens": (i32, [vp]),
        "llama_tokenize": (i32, [vp, ctypes.c_char_p, i32, ctypes.POINTER(i32), i32, b, b]),
        "llama_batch_init": (_Batch, [i32, i32, i32]),
        "llama_batch_free": (None, [_Batch]),
        "llama_decode": (i32, [vp, _Batch]),
        "llama_get_logits_ith": (ctypes.POINTER(ctypes.c_float), [vp, i32]),
        "llama_get_memory": (vp, [vp]),
        "llama_memory_clear": (None, [vp, b]),
        "llama_free": (None, [vp]),
        "llama_model_free": (None, [vp]),
        "llama_log_set": (None, [vp, vp]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    lib._quiet = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda *a: None)
    if not os.environ.get("ELASTICMOE_LLAMA_LOG"):  # llama.cpp logs every load to stderr otherwise
        lib.llama_log_set(ctypes.cast(lib._quiet, vp), None)
    lib.llama_backend_init()
    _LIB = lib
    return lib


class LlamaCpp:
    """A GGUF file loaded in llama.cpp through its C API (ctypes; see `llama_library`).

    Used: `llama_tokenize`, `llama_decode` with logits requested at chosen positions,
    `llama_get_logits_ith`, and clearing the KV cache between sequences.
    """

    def __init__(self, path: Path, n_ctx: int, threads: int = 1):
        lib = self.lib = _lib()
        self.model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
        if not self.model:
            raise HFError(f"llama.cpp could not load {path}")
        params = lib.llama_context_default_params()
        n_ctx_, n_batch, n_ubatch, n_seq_max, _, _, _, n_threads, n_threads_batch = params.head
        if not (n_seq_max == 1 and n_batch >= n_ubatch > 0 and n_ctx_ > 0 and n_threads == n_threads_batch > 0):
            lib.llama_model_free(self.model)
            raise HFError(
                f"{llama_library()} has a llama_context_params layout this code does not know "
                f"(defaults {list(params.head)}); install the xllamacpp version in requirements.txt"
            )
        for i in range(7):  # n_ctx, n_batch, n_ubatch, _, _, n_outputs_max, n_outputs_max_per_seq
            if i not in (3, 4):
                params.head[i] = n_ctx
        params.head[7] = params.head[8] = threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise HFError(f"llama.cpp could not create a context for {path}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Ids of `text`; special tokens written in the text are parsed, as our tokenizer does."""
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (ctypes.c_int32 * size)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, size, add_bos, True)
        if n < 0:
            raise HFError(f"llama_tokenize failed ({n}) on {text[:40]!r}")
        return list(buf[:n])

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, tokens: list[int], start: int, all_logits: bool) -> np.ndarray:
        """Feed `tokens` at positions start...; return logits (n, V) at every position or the last."""
        n = len(tokens)
        batch = self.lib.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(t), start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if all_logits or i == n - 1 else 0
            rc = self.lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise HFError(f"llama_decode failed with code {rc}")
        finally:
            self.lib.llama_batch_free(batch)
        rows = range(n) if all_logits else [n - 1]
        out = np.empty((len(rows), self.n_vocab), dtype=np.float32)
        for r, i in enumerate(rows):
            out[r] = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
        return out

    def logits(self, tokens: list[int]) -> np.ndarray:
        self.clear()
        return self.decode(tokens, 0, all_logits=True)

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Greedy continuation (argmax of the logits), KV-cached, one token per decode call."""
        self.clear()
        logits = self.decode(prompt, 0, all_logits=False)
        out: list[int] = []
        for _ in range(new_tokens):
            out.append(int(logits[-1].argmax()))
            if len(prompt) + len(out) >= self.n_ctx or len(out) == new_tokens:
                break
            logits = self.decode(out[-1:], len(prompt) + len(out) - 1, all_logits=False)
        return out

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None


def random_unicode(n_strings: int, seed: int = 0, max_len: int = 40) -> list[str]:
    """Strings of random code points (letters, digits, marks, spaces, emoji; surrogates excluded)."""
    rng = np.random.default_rng(seed)
    pools = [
        (0x20, 0x7F),
        (0xA0, 0x2FF),
        (0x370, 0x52F),
        (0x600, 0x6FF),
        (0x900, 0x97F),
        (0x3040, 0x30FF),
        (0x4E00, 0x4FFF),
        (0xAC00, 0xAD00),
        (0x1F300, 0x1F64F),
        (0x660, 0x669),
        (0xFF10, 0xFF19),
    ]
    extra = [" ", "  ", "\n", "\t", "\n\n", "'s", "'ll", "0", "1", "42", "3.14", " 12", "<|endoftext|>"]
    out = []
    for _ in range(n_strings):
        parts = []
        for _ in range(int(rng.integers(1, max_len))):
            if rng.random() < 0.25:
                parts.append(extra[int(rng.integers(len(extra)))])
            else:
                lo, hi = pools[int(rng.integers(len(pools)))]
                parts.append(chr(int(rng.integers(lo, hi))))
        out.append("".join(parts))
    return out


def distribution_agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(mean over positions of KL(softmax(ours) || softmax(theirs)) in nats, share of positions
    whose top-1 token agrees) for logits of shape (..., vocab)."""
    a = torch.from_numpy(np.asarray(ours, dtype=np.float32)).log_softmax(-1)
    b = torch.from_numpy(np.asarray(theirs, dtype=np.float32)).log_softmax(-1)
    kl = (a.exp() * (a - b)).sum(-1)
    return float(kl.mean()), float((a.argmax(-1) == b.argmax(-1)).float().mean())


@torch.no_grad()
def verify_gguf(
    model: ElasticMoE,
    path: Path,
    tokens: torch.Tensor,
    texts: list[str],
    tokenizer,
    qtype: str = "f32",
    tolerance: float | None = None,
    new_tokens: int = 16,
) -> dict[str, Any]:
    """Run the GGUF in llama.cpp: ids on `texts`, logits on `tokens` (B, T), greedy continuations.

    Raises HFError (nothing is published by `export_gguf`) when a text tokenises differently or the
    logits differ by more than `tolerance` (default `TOLERANCE[qtype]`) from `model` running the
    weights as the file stores them (`as_stored`); how far that rounding itself moved the logits
    is reported beside it. Greedy agreement (with the stored weights) is measured and reported:
    exact for f32 (a test holds it to that), llama.cpp's arithmetic can flip near-ties in f16/q8_0.
    """
    tolerance = TOLERANCE[qtype] if tolerance is None else tolerance
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    model = model.float().eval() if model.embed.weight.dtype != torch.float32 else model.eval()
    unrounded = model(tokens).logits.float().numpy()
    model = as_stored(model, qtype) if qtype != "f32" else model
    runner = LlamaCpp(path, n_ctx=model.config.max_seq_len)
    try:
        mismatched = [t for t in texts if runner.tokenize(t) != tokenizer.encode(t)]
        if mismatched:
            raise HFError(
                f"llama.cpp tokenises {len(mismatched)} of {len(texts)} texts differently from our tokenizer, "
                f"e.g. {mismatched[0]!r}; nothing written"
            )
        ours = model(tokens).logits.float().numpy()
        shift = float(np.abs(ours - unrounded).max())
        theirs = np.stack([np.asarray(runner.logits(row.tolist()), dtype=np.float32) for row in tokens])
        diff = float(np.abs(theirs - ours).max())
        scale = max(1.0, float(np.abs(ours).max()))
        kl, top1 = distribution_agreement(ours, theirs)
        close = diff <= tolerance * scale
        if not close and not (qtype == "q8_0" and kl <= Q8_KL and top1 >= Q8_TOP1):
            extra = f"; mean KL {kl:.3g} nats (limit {Q8_KL}), top-1 agreement {top1:.1%}" if qtype == "q8_0" else ""
            raise HFError(
                f"llama.cpp does not reproduce the model ({qtype}): max abs logit difference {diff:.3g} from the "
                f"weights as stored exceeds {tolerance:g} x {scale:.3g} (the largest logit){extra}; nothing written"
            )
        prompts = tokens[:, : max(1, min(8, tokens.shape[1] // 2))]
        budget = min(new_tokens, model.config.max_seq_len - prompts.shape[1])
        theirs = [runner.greedy(p.tolist(), budget) for p in prompts]
        ours_greedy = model.generate(prompts, budget)[:, prompts.shape[1] :].tolist()
        same = sum(a == b for a, b in zip(theirs, ours_greedy))
    finally:
        runner.close()
    return {
        "runtime": _runtime_version(),
        "qtype": qtype,
        "max_abs_logit_diff": diff,
        "compared_with": "elasticmoe on the weights as the file stores them" if qtype != "f32" else "elasticmoe",
        "quantisation_logit_shift": shift,
        "mean_kl_nats": kl,
        "top1_agreement": top1,
        "passed_on": "logits" if close else f"distributions (mean KL <= {Q8_KL}, top-1 agreement >= {Q8_TOP1})",
        "max_abs_logit": scale,
        "tolerance": f"{tolerance:g} x max(1, max |logit|)",
        "tokens_verified": int(tokens.numel()),
        "texts_tokenized_identically": len(texts),
        "greedy_identical": f"{same}/{len(theirs)}",
        "greedy_new_tokens": budget,
    }


def sample_texts(run: Path | None, per_task: int = 10, max_chars: int = 2000) -> list[str]:
    """Texts to compare llama.cpp's ids with ours: random Unicode, plus the first test documents of
    each task of `run`'s corpus when the run is on this machine."""
    texts = random_unicode(50)
    if run is not None:
        from .evaluate import load_eval_data

        try:
            corpus, _ = load_eval_data(run)
        except ConfigError:
            return texts
        split = "test" if "test" in corpus.docs else next(iter(corpus.docs), None)
        for docs in (corpus.docs.get(split) or {}).values():
            texts += [d[:max_chars] for d in docs[:per_task]]
    return texts


def _runtime_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    lib = llama_library()
    for dist in ("xllamacpp", "llama-cpp-python"):
        try:
            return f"llama.cpp from {dist} {version(dist)} ({lib.name})"
        except PackageNotFoundError:
            continue
    return f"llama.cpp ({lib})"


def export_gguf(
    model_dir_or_model: ElasticMoE | str | Path,
    out_dir: str | Path,
    qtype: str = "f32",
    tokenizer_path: str | Path | None = None,
    verify_tokens: torch.Tensor | None = None,
    texts: list[str] | None = None,
    provenance: dict[str, Any] | None = None,
    verify: bool = True,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """Write `out_dir/model-<qtype>.gguf` and a model card, checked in llama.cpp before it is published.

    `verify_tokens`: (B, T) ids to compare logits on; None draws random ids (seeded) and says so in
    the record. `texts`: strings whose llama.cpp ids must equal ours (default `sample_texts`: random
    Unicode and the run's test documents). Returns the provenance record (with `gguf_verification`).
    """
    from .model_card import model_card, model_name, portable
    from .tokenizer import load_tokenizer

    if qtype not in QTYPES:
        raise ConfigError(f"GGUF type {qtype!r} is not supported; choose one of {list(QTYPES)}")
    model, meta, tokenizer_path = export_source(model_dir_or_model, tokenizer_path)
    if tokenizer_path is None:
        raise ConfigError("GGUF export needs the model's tokenizer.json (llama.cpp files carry the tokenizer)")
    _llama_arch(model.config)  # refuses what no stock architecture (or this writer) expresses
    record: dict[str, Any] = json.loads(json.dumps({**meta, **(provenance or {})}, default=str))
    record.setdefault("name", model_name(record, out_dir))
    record["out"] = str(out_dir)
    record["gguf"] = {"arch": _llama_arch(model.config), "qtype": qtype, "pre": PRE_TOKENIZER}
    source_of_tokens = "token ids given by the caller (held-out ones of the run from `elasticmoe export`)"
    if verify_tokens is None:
        g = torch.Generator().manual_seed(0)
        length = min(64, model.config.max_seq_len)
        verify_tokens = torch.randint(0, model.config.vocab_size, (2, length), generator=g)
        source_of_tokens = "random token ids (no run folder to take held-out tokens from)"
    with checkpoint.AtomicFolder(out_dir, kind="gguf-export") as tmp:
        file = tmp / GGUF_FILE.format(qtype=qtype)
        write_gguf(model, file, Path(tokenizer_path), qtype, name=record["name"])
        if verify:
            tokenizer = load_tokenizer(tokenizer_path)
            started = time.perf_counter()
            from .model_card import run_folder

            texts = texts if texts is not None else sample_texts(run_folder(record))
            check = verify_gguf(model, file, verify_tokens, texts, tokenizer, qtype, tolerance)
            check["tokens"] = source_of_tokens
            check["seconds"] = round(time.perf_counter() - started, 2)
            record["gguf_verification"] = check
        (tmp / "README.md").write_text(
            model_card(
                model,
                record,
                architecture_for(model.config),
                ARCHITECTURES[architecture_for(model.config)],
                gguf_file=file.name,
            ),
            encoding="utf-8",
        )
        checkpoint.write_json(tmp / "export.json", portable(record))
    log.info("exported GGUF (%s, %s) to %s", record["gguf"]["arch"], qtype, out_dir)
    return record


def held_out_tokens(model_dir: Path, windows: int = 2) -> torch.Tensor | None:
    """Validation windows of the run a child came from (as `elasticmoe export` checks HF exports
    on), or None outside a run."""
    from .phases import parent_run_of, run_recipe
    from .rundata import load_run_data

    try:
        run = parent_run_of(model_dir)
        if run is None:
            return None
        data = load_run_data(run, run_recipe(run))
        return next(iter(data.eval_windows("val", windows).values()))[:, :-1]
    except (ConfigError, OSError):
        return None


def main(argv: list[str] | None = None) -> int:
    """`python -m elasticmoe.gguf_export MODEL_DIR --out DIR [--type f16]` (what `elasticmoe export
    --format gguf` runs)."""
    import argparse
    import sys

    from .phases import model_folder

    ap = argparse.ArgumentParser(prog="python -m elasticmoe.gguf_export", description=main.__doc__)
    ap.add_argument("model_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--type", dest="qtype", choices=QTYPES, default="f32", help="GGUF tensor type")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        src = model_folder(args.model_dir)
        record = export_gguf(src, Path(args.out), qtype=args.qtype, verify_tokens=held_out_tokens(src))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(gguf_summary(record, args.out))
    return 0


def gguf_summary(record: dict[str, Any], out: str | Path) -> str:
    """The one line `export --format gguf` prints."""
    v = record.get("gguf_verification") or {}
    g = record["gguf"]
    line = f"wrote {out} (gguf {g['qtype']}, llama.cpp arch {g['arch']})"
    if "max_abs_logit_diff" in v:
        line += (
            f" | llama.cpp vs elasticmoe max |logit diff| {v['max_abs_logit_diff']:.2e} on {v['tokens']}; "
            f"greedy identical {v['greedy_identical']}; ids identical on {v['texts_tokenized_identically']} texts"
        )
    return line


__all__ = [
    "QTYPES",
    "LlamaCpp",
    "export_gguf",
    "gguf_summary",
    "gguf_tensors",
    "held_out_tokens",
    "random_unicode",
    "verify_gguf",
    "write_gguf",
]


if __name__ == "__main__":
    raise SystemExit(main())
