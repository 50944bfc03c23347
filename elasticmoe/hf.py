"""Hugging Face transformers export (stock architectures, no custom code); import is `hf_import`.

Architecture mapping. Our block *is* a stock block, chosen by `qk_norm`:

* `qk_norm=False` -> `MixtralForCausalLM` (model_type `mixtral`);
* `qk_norm=True`  -> `Qwen3MoeForCausalLM` (model_type `qwen3_moe`) with `norm_topk_prob=True`,
  every layer sparse (`decoder_sparse_step=1`, `mlp_only_layers=[]`).

Conventions fixed by this mapping (each is what both sides compute; the parity tests prove it):

* router: softmax over the experts in float32, top-k of the probabilities, the k kept
  probabilities renormalised to sum to one (Mixtral always; Qwen3-MoE via `norm_topk_prob=True`);
  no router bias, no jitter at inference, no shared expert (a model with one is refused);
* experts: SwiGLU `down(silu(gate x) * up x)`, no biases; Mixtral's on-disk names are
  w1 = gate, w3 = up, w2 = down;
* RoPE: rotate-half (GPT-NeoX) convention, `rope_parameters = {"rope_type": "default",
  "rope_theta": theta}` (where transformers 5.x reads it) and the same theta as top-level
  `rope_theta` (where 4.x reads it: without it, 4.x silently takes Mixtral's default 1e6), applied
  to the whole head (`head_dim` stated explicitly), after Qwen3's per-head q/k RMSNorm;
* attention: grouped-query, scale `head_dim ** -0.5`, no biases (`attention_bias=false`), full
  causal attention (`sliding_window=null`, `use_sliding_window=false`), no dropout;
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

What the stock architectures cannot express, we refuse to export (with the reason): a shared
expert, and per-layer heterogeneous expert counts, top-k or widths (`layer_shapes`). The parent's
`layer_order` (keep priority) has no transformers field; it goes into the provenance.

Import is defensive: only safetensors, parsed without running anything from the folder.
Refused: pickle weight files (`.bin`, `.pt`, `.pth`, `.pkl`, ...) even beside safetensors, Python
files, `auto_map` (remote code), unknown model types or architectures, quantized weights, RoPE
scaling, sliding windows, attention biases, Qwen3-MoE dense layers or un-normalised top-k, and
safetensors headers whose keys or shapes differ from what config.json implies (checked from the
headers before any tensor is read or the model is allocated). Imported weights become float32.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import ConfigError, ModelConfig
from .model import ElasticMoE

log = logging.getLogger(__name__)

MIXTRAL, QWEN3_MOE = "mixtral", "qwen3_moe"
ARCHITECTURES = {MIXTRAL: "MixtralForCausalLM", QWEN3_MOE: "Qwen3MoeForCausalLM"}
DEFAULT_THETA = {MIXTRAL: 1_000_000.0, QWEN3_MOE: 10_000.0}  # transformers' defaults when unstated
DEFAULT_EPS = {MIXTRAL: 1e-5, QWEN3_MOE: 1e-6}
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
GLOBAL_KEYS = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
HEAD_KEY = ("lm_head.weight", "lm_head.weight")
# MoE module prefix and per-expert (gate, up, down) names as `save_pretrained` writes them.
MOE_PREFIX = {MIXTRAL: "block_sparse_moe", QWEN3_MOE: "mlp"}
EXPERT_NAMES = {MIXTRAL: ("w1", "w3", "w2"), QWEN3_MOE: ("gate_proj", "up_proj", "down_proj")}
# Keys some older checkpoints carry that hold no weights (recomputed buffers).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


class HFError(ConfigError):
    """A model cannot be exported to, or a folder cannot be imported from, a stock architecture."""


# -- shared: which architecture, which keys ---------------------------------------------------
def architecture_for(config: ModelConfig) -> str:
    """model_type for `config`, or HFError saying why no stock architecture can express it."""
    problems = []
    if config.shared_expert_width > 0:
        problems.append(
            f"shared_expert_width={config.shared_expert_width}: Mixtral and Qwen3-MoE have no shared "
            "(always-on) expert, so its output would be silently lost"
        )
    if len(set(config.layer_shapes)) > 1:
        problems.append(
            f"per-layer shapes {[list(s) for s in config.layer_shapes]}: the stock config states one expert "
            "count, one top-k and one expert width for every layer; extract a uniform sub-network instead"
        )
    if problems:
        raise HFError("cannot export to a stock transformers architecture: " + "; ".join(problems))
    return QWEN3_MOE if config.qk_norm else MIXTRAL


def _expert_keys(model_type: str, layer: int, expert: int) -> tuple[str, str, str]:
    prefix = f"model.layers.{layer}.{MOE_PREFIX[model_type]}.experts.{expert}"
    return tuple(f"{prefix}.{name}.weight" for name in EXPERT_NAMES[model_type])  # type: ignore[return-value]


def _router_key(model_type: str, layer: int) -> str:
    return f"model.layers.{layer}.{MOE_PREFIX[model_type]}.gate.weight"


def expected_shapes(config: ModelConfig, model_type: str) -> dict[str, tuple[int, ...]]:
    """Every transformers key (on-disk names, as `save_pretrained` writes them) and its shape."""
    c = config
    D, V = c.d_model, c.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not c.tie_embeddings:
        out["lm_head.weight"] = (V, D)
    attn = {
        "input_layernorm.weight": (D,),
        "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (c.heads * c.head_dim, D),
        "self_attn.k_proj.weight": (c.kv_heads * c.head_dim, D),
        "self_attn.v_proj.weight": (c.kv_heads * c.head_dim, D),
        "self_attn.o_proj.weight": (D, c.heads * c.head_dim),
    }
    if model_type == QWEN3_MOE:
        attn["self_attn.q_norm.weight"] = (c.head_dim,)
        attn["self_attn.k_norm.weight"] = (c.head_dim,)
    for i in range(c.layers):
        E, _, W = c.layer_shape(i)
        out.update({f"model.layers.{i}.{k}": s for k, s in attn.items()})
        out[_router_key(model_type, i)] = (E, D)
        for e in range(E):
            gate, up, down = _expert_keys(model_type, i, e)
            out.update({gate: (W, D), up: (W, D), down: (D, W)})
    return out


# -- export -----------------------------------------------------------------------------------
def hf_state_dict(model: ElasticMoE, model_type: str) -> dict[str, torch.Tensor]:
    """Our tensors under transformers' on-disk names (contiguous copies, one per expert)."""
    c = model.config
    ours = model.state_dict()
    out = {hf: ours[k] for k, hf in GLOBAL_KEYS.items()}
    if not c.tie_embeddings:
        out[HEAD_KEY[1]] = ours[HEAD_KEY[0]]
    per_layer = dict(LAYER_KEYS, **(QK_NORM_KEYS if model_type == QWEN3_MOE else {}))
    for i in range(c.layers):
        out.update({f"model.layers.{i}.{hf}": ours[f"blocks.{i}.{k}"] for k, hf in per_layer.items()})
        out[_router_key(model_type, i)] = ours[f"blocks.{i}.moe.router.weight"]
        w_gate, w_up, w_down = (ours[f"blocks.{i}.moe.{n}"] for n in ("w_gate", "w_up", "w_down"))
        for e in range(w_gate.shape[0]):
            gate, up, down = _expert_keys(model_type, i, e)
            out.update({gate: w_gate[e], up: w_up[e], down: w_down[e]})
    # Clones: safetensors refuses tensors that share storage (expert slices of one stacked tensor).
    return {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in out.items()}


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
    else:
        out.update(
            moe_intermediate_size=c.expert_width,
            intermediate_size=c.expert_width,  # dense-MLP width; unused with no dense layers
            num_experts=c.experts,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            attention_bias=False,
            use_sliding_window=False,
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
    model, meta, tokenizer_path = export_source(model_dir_or_model, tokenizer_path)
    model_type = architecture_for(model.config)
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
    from .model_card import model_card, model_name

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
        checkpoint.write_json(tmp / "config.json", hf_config(model.config, model_type, dtype, token_id, record, pad_id))
        if verify:
            record["hf_verification"] = {**_verify_folder(model, tmp, verify_tokens, tolerance), "tokens": tokens_note}
        else:
            record["hf_verification"] = {"skipped": "verify=False"}
        checkpoint.write_json(tmp / "config.json", hf_config(model.config, model_type, dtype, token_id, record, pad_id))
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
    "HFError",
    "architecture_for",
    "expected_shapes",
    "export_hf",
    "hf_config",
    "hf_state_dict",
    "max_logit_diff_hf",
]
