"""Hugging Face transformers export and import (stock architectures, no custom code).

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
  "rope_theta": theta}` (transformers 5.x states theta there, not at the top level), applied to
  the whole head (`head_dim` stated explicitly), after Qwen3's per-head q/k RMSNorm;
* attention: grouped-query, scale `head_dim ** -0.5`, no biases (`attention_bias=false`), full
  causal attention (`sliding_window=null`, `use_sliding_window=false`), no dropout;
* RMSNorm: `weight * x * rsqrt(mean(x^2) + eps)` computed in float32, `rms_norm_eps = norm_eps`;
  pre-norm (`input_layernorm` before attention, `post_attention_layernorm` before the MoE);
* embeddings: tied exactly when `tie_embeddings` (`tie_word_embeddings`); tied folders carry no
  `lm_head.weight`;
* weights on disk: one `model.safetensors` (metadata `format: pt`) with the per-expert key names
  `save_pretrained` writes in transformers 5.x, float32 as stored in the model;
* tokens: `<|endoftext|>` is bos, eos and pad; tokenizer class `PreTrainedTokenizerFast`.

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
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import ConfigError, ElasticSpace, ModelConfig
from .model import ElasticMoE

log = logging.getLogger(__name__)

MIXTRAL, QWEN3_MOE = "mixtral", "qwen3_moe"
ARCHITECTURES = {MIXTRAL: "MixtralForCausalLM", QWEN3_MOE: "Qwen3MoeForCausalLM"}
DEFAULT_THETA = {MIXTRAL: 1_000_000.0, QWEN3_MOE: 10_000.0}  # transformers' defaults when unstated
DEFAULT_EPS = {MIXTRAL: 1e-5, QWEN3_MOE: 1e-6}
SPECIAL_TOKEN = "<|endoftext|>"
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


def hf_config(
    config: ModelConfig,
    model_type: str,
    dtype: torch.dtype = torch.float32,
    token_id: int | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json for `config` as a stock `model_type` (see the module docstring's conventions)."""
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
        "pad_token_id": token_id,
        "dtype": _dtype_name(dtype),
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


def _special_token_id(tokenizer_json: Path) -> int | None:
    """Id of `<|endoftext|>` in a tokenizers JSON file (added tokens first, then the vocab)."""
    try:
        data = json.loads(Path(tokenizer_json).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HFError(f"{tokenizer_json} is not a readable tokenizer.json: {exc}") from None
    for tok in data.get("added_tokens") or []:
        if tok.get("content") == SPECIAL_TOKEN:
            return int(tok["id"])
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and SPECIAL_TOKEN in vocab:
        return int(vocab[SPECIAL_TOKEN])
    return None


def _write_tokenizer(tokenizer_json: Path, folder: Path, max_len: int) -> int | None:
    """Tokenizer files for transformers in `folder`; return the `<|endoftext|>` id (bos/eos/pad).

    Uses the project's `Tokenizer.save` (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json) when `elasticmoe.tokenizer` is importable; otherwise copies
    tokenizer.json and writes a tokenizer_config.json with the same conventions.
    """
    try:
        from .tokenizer import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        tokenizer = load_tokenizer(tokenizer_json)
        tokenizer.save(folder)
        return tokenizer.eos_id
    token_id = _special_token_id(tokenizer_json)
    if token_id is None:
        raise HFError(f"{tokenizer_json} has no {SPECIAL_TOKEN} token, which the export uses as bos, eos and pad")
    shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKEN,
        "eos_token": SPECIAL_TOKEN,
        "pad_token": SPECIAL_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    checkpoint.write_json(folder / "tokenizer_config.json", tok_config)
    return token_id


def _model_card(config: ModelConfig, model_type: str, provenance: dict[str, Any]) -> str:
    c = config
    arch = ARCHITECTURES[model_type]
    verification = provenance.get("verification") or {}
    hf_check = provenance.get("hf_verification") or {}
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [elasticmoe, mixture-of-experts, {model_type}]",
        "---",
        "",
        f"# elasticmoe export ({arch})",
        "",
        f"A stock `{arch}` written by elasticmoe: loads with `AutoModelForCausalLM.from_pretrained(folder)`, "
        "no custom code, no `trust_remote_code`.",
        "",
        "| field | value |",
        "|---|---|",
    ]
    rows = {
        "layers / d_model / vocab": f"{c.layers} / {c.d_model} / {c.vocab_size}",
        "heads / kv heads / head dim": f"{c.heads} / {c.kv_heads} / {c.head_dim}",
        "experts / top-k / expert width": f"{c.experts} / {c.top_k} / {c.expert_width}",
        "tied embeddings / qk norm": f"{c.tie_embeddings} / {c.qk_norm}",
        "RoPE theta / max sequence length": f"{c.rope_theta:g} / {c.max_seq_len}",
        "params / active params per token": f"{provenance.get('params', '?')} / {provenance.get('active_params', '?')}",
    }
    lines += [f"| {k} | {v} |" for k, v in rows.items()]
    lines += ["", "## Provenance", ""]
    parent = provenance.get("parent")
    if isinstance(parent, dict) and parent.get("path"):
        lines.append(
            f"- parent: `{parent['path']}`"
            + (f" (model sha256 `{parent['model_sha256']}`)" if parent.get("model_sha256") else "")
        )
    if provenance.get("subnet"):
        lines.append(f"- sub-network: `{provenance['subnet']}`")
    if verification:
        lines.append(
            f"- extraction verified: max abs logit difference {verification.get('max_abs_logit_diff')} "
            f"(tolerance {verification.get('tolerance')}) on {verification.get('tokens_verified')} held-out tokens"
        )
    if hf_check:
        lines.append(
            f"- export verified with transformers {hf_check.get('transformers_version')}: max abs logit "
            f"difference {hf_check.get('max_abs_logit_diff')} on {hf_check.get('tokens_verified')} tokens"
        )
    lines += [
        "",
        "## Conventions",
        "",
        "- router: float32 softmax over experts, top-k, kept probabilities renormalised to sum to one",
        "- SwiGLU experts, no biases anywhere, no shared expert",
        "- RoPE rotate-half, `rope_type: default`; RMSNorm computed in float32",
        "- `<|endoftext|>` is bos, eos and pad",
        "",
        "## Full provenance",
        "",
        "```json",
        json.dumps(provenance, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data, default=str))


def export_hf(
    model_dir_or_model: ElasticMoE | str | Path,
    out_dir: str | Path,
    tokenizer_path: str | Path | None = None,
    provenance: dict[str, Any] | None = None,
    verify_tokens: torch.Tensor | None = None,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Write a stock transformers folder (weights, config, generation config, tokenizer, model card).

    `model_dir_or_model`: a model folder (its meta, e.g. a child's extraction record, joins the
    provenance, and its tokenizer.json is used when `tokenizer_path` is not given) or a model.
    `verify_tokens`: if given, the folder is loaded with transformers before it is put in place and
    refused (nothing written) unless its logits match ours to `tolerance`. Returns the provenance.
    """
    meta: dict[str, Any] = {}
    if isinstance(model_dir_or_model, ElasticMoE):
        model = model_dir_or_model
    else:
        source = Path(model_dir_or_model)
        model, meta = checkpoint.load_model(source)
        meta = {"source": str(source), **meta}
        if tokenizer_path is None and (source / "tokenizer.json").is_file():
            tokenizer_path = source / "tokenizer.json"
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
    from safetensors.torch import save_file

    with checkpoint.AtomicFolder(out_dir) as tmp:
        save_file(hf_state_dict(model, model_type), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        token_id = None
        if tokenizer_path is not None:
            token_id = _write_tokenizer(Path(tokenizer_path), tmp, model.config.max_seq_len)
        generation = {"bos_token_id": token_id, "eos_token_id": token_id, "pad_token_id": token_id}
        checkpoint.write_json(tmp / "generation_config.json", generation)
        checkpoint.write_json(tmp / "config.json", hf_config(model.config, model_type, dtype, token_id, record))
        if verify_tokens is not None:
            record["hf_verification"] = _verify_folder(model, tmp, verify_tokens, tolerance)
            checkpoint.write_json(tmp / "config.json", hf_config(model.config, model_type, dtype, token_id, record))
        (tmp / "README.md").write_text(_model_card(model.config, model_type, record))
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


# -- import -----------------------------------------------------------------------------------
def _refuse_unsafe_files(folder: Path) -> None:
    pickles = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES
    )
    if pickles:
        raise HFError(
            f"{folder} holds pickle-format weight files {pickles}: loading them can run arbitrary code, "
            "and their presence makes it ambiguous which weights are meant. Remove them and keep safetensors only"
        )
    code = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py"))
    if code:
        raise HFError(
            f"{folder} holds Python files {code} (custom model code); only stock architectures "
            "are imported and nothing from the folder is ever run. Remove them"
        )


def _rope_theta(raw: dict[str, Any], model_type: str, p: list[str]) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        p.append(f"rope_parameters={params!r} must be a mapping")
        return 0.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        p.append(f"rope_type={rope_type!r}: only plain RoPE ('default') is supported, no scaling")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        p.append(f"partial_rotary_factor={params['partial_rotary_factor']}: only full-head RoPE is supported")
    theta = params.get("rope_theta", raw.get("rope_theta", DEFAULT_THETA[model_type]))
    return float(theta) if isinstance(theta, (int, float)) else theta


def read_hf_config(folder: str | Path) -> tuple[str, ModelConfig]:
    """(model_type, ModelConfig) from a transformers config.json, read as plain JSON.

    Raises HFError listing every setting our block cannot reproduce exactly.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise HFError(f"{path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HFError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise HFError(f"{path}: top level must be a mapping")
    if "auto_map" in raw or raw.get("trust_remote_code"):
        raise HFError(
            f"{path} has auto_map / trust_remote_code: the folder asks to run its own Python code. "
            "Only stock Mixtral and Qwen3-MoE folders are imported, and no code from a folder is run"
        )
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise HFError(f"{path}: model_type={model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    p: list[str] = []
    arch = raw.get("architectures") or [ARCHITECTURES[model_type]]
    if arch != [ARCHITECTURES[model_type]]:
        p.append(f"architectures={arch}: expected [{ARCHITECTURES[model_type]!r}]")
    if raw.get("quantization_config"):
        p.append("quantization_config is set: quantized weights are not supported")
    if raw.get("hidden_act", "silu") not in ("silu", "swish"):
        p.append(f"hidden_act={raw.get('hidden_act')!r}: experts must be SwiGLU (silu)")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        p.append("attention_bias / mlp_bias is true: our projections have no biases")
    window = raw.get("sliding_window")
    use_window = raw.get("use_sliding_window", model_type == MIXTRAL)
    max_len = raw.get("max_position_embeddings", 4096 * 32 if model_type == MIXTRAL else 32768)
    if use_window and window is not None and isinstance(max_len, int) and window < max_len:
        p.append(
            f"sliding_window={window} < max_position_embeddings={max_len}: only full causal attention is supported"
        )
    experts = raw.get("num_local_experts", raw.get("num_experts", 8 if model_type == MIXTRAL else 128))
    if "num_local_experts" in raw and "num_experts" in raw and raw["num_local_experts"] != raw["num_experts"]:
        p.append(f"num_local_experts={raw['num_local_experts']} and num_experts={raw['num_experts']} disagree")
    if model_type == MIXTRAL:
        width = raw.get("intermediate_size", 14336)
    else:
        width = raw.get("moe_intermediate_size", 768)
        if raw.get("decoder_sparse_step", 1) != 1 or raw.get("mlp_only_layers"):
            p.append(
                f"decoder_sparse_step={raw.get('decoder_sparse_step', 1)}, mlp_only_layers="
                f"{raw.get('mlp_only_layers')}: this model has dense (non-MoE) layers, which our block lacks"
            )
        if not raw.get("norm_topk_prob", False):
            p.append("norm_topk_prob is false: our router always renormalises the top-k probabilities")
        if raw.get("shared_expert_intermediate_size"):
            p.append("shared_expert_intermediate_size is set: shared experts cannot be imported")
    theta = _rope_theta(raw, model_type, p)
    if p:
        raise HFError(f"{path} cannot be imported exactly: " + "; ".join(p))
    hidden = raw.get("hidden_size", 4096 if model_type == MIXTRAL else 2048)
    heads = raw.get("num_attention_heads", 32)
    head_dim = raw.get("head_dim")
    if head_dim is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        head_dim = hidden // heads  # transformers' rule when head_dim is not stated
    fields = dict(
        vocab_size=raw.get("vocab_size"),
        d_model=hidden,
        layers=raw.get("num_hidden_layers"),
        heads=heads,
        kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        experts=experts,
        top_k=raw.get("num_experts_per_tok", 2 if model_type == MIXTRAL else 8),
        expert_width=width,
        rope_theta=theta,
        norm_eps=raw.get("rms_norm_eps", DEFAULT_EPS[model_type]),
        max_seq_len=max_len,
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qk_norm=model_type == QWEN3_MOE,
    )
    try:
        return model_type, ModelConfig(**fields)
    except ConfigError as exc:
        raise HFError(f"{path} describes a model our config rejects: {exc}") from None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise HFError(f"{index} is not a valid safetensors index: {exc}") from None
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or not n.endswith(".safetensors")]
        if bad:
            raise HFError(f"{index} names shard files outside the folder or not safetensors: {bad}")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise HFError(f"{index} names shard files that are missing: {missing}")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise HFError(f"{folder} has no model.safetensors (nor model.safetensors.index.json)")


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """key -> (file, shape, dtype) from the safetensors headers only (no tensor is read)."""
    from safetensors import safe_open

    found: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if key in found:
                        raise HFError(f"tensor {key} appears in both {found[key][0].name} and {f.name}")
                    view = st.get_slice(key)
                    found[key] = (f, tuple(view.get_shape()), view.get_dtype())
        except HFError:
            raise
        except Exception as exc:  # safetensors' own header validation (offsets, sizes, JSON)
            raise HFError(f"{f} has an invalid safetensors header: {exc}") from None
    return found


def _check_headers(headers: dict, expected: dict[str, tuple[int, ...]], tied: bool) -> None:
    p: list[str] = []
    extra = [
        k
        for k in headers
        if k not in expected and not k.endswith(IGNORABLE_SUFFIXES) and not (tied and k == "lm_head.weight")
    ]
    missing = [k for k in expected if k not in headers]
    wrong = [
        f"{k}: file says {list(headers[k][1])}, config.json implies {list(s)}"
        for k, s in expected.items()
        if k in headers and headers[k][1] != s
    ]
    if tied and "lm_head.weight" in headers and headers["lm_head.weight"][1] != expected["model.embed_tokens.weight"]:
        wrong.append(f"lm_head.weight: file says {list(headers['lm_head.weight'][1])}, embeddings are tied")
    dtypes = sorted({d for k, (_, _, d) in headers.items() if k in expected and d not in FLOAT_DTYPES})

    def some(items: list[str]) -> str:
        return ", ".join(items[:8]) + (f" (and {len(items) - 8} more)" if len(items) > 8 else "")

    if wrong:
        p.append(f"shapes disagree with config.json: {some(wrong)}")
    if missing:
        p.append(f"missing tensors: {some(missing)}")
    if extra:
        p.append(f"unexpected tensors (weights we would silently drop): {some(extra)}")
    if dtypes:
        p.append(f"unsupported tensor dtypes {dtypes}: only float weights are imported")
    if p:
        raise HFError("safetensors weights do not match config.json: " + "; ".join(p))


def _our_state(model_type: str, config: ModelConfig, load) -> dict[str, torch.Tensor]:
    """Our state dict from a `load(hf_key) -> float32 tensor` callback (inverse of `hf_state_dict`)."""
    c = config
    state = {k: load(hf) for k, hf in GLOBAL_KEYS.items()}
    if not c.tie_embeddings:
        state[HEAD_KEY[0]] = load(HEAD_KEY[1])
    per_layer = dict(LAYER_KEYS, **(QK_NORM_KEYS if model_type == QWEN3_MOE else {}))
    for i in range(c.layers):
        state.update({f"blocks.{i}.{k}": load(f"model.layers.{i}.{hf}") for k, hf in per_layer.items()})
        state[f"blocks.{i}.moe.router.weight"] = load(_router_key(model_type, i))
        keys = [_expert_keys(model_type, i, e) for e in range(c.layer_shape(i)[0])]
        for n, name in enumerate(("w_gate", "w_up", "w_down")):
            state[f"blocks.{i}.moe.{name}"] = torch.stack([load(k[n]) for k in keys])
    return state


def import_hf(hf_dir: str | Path, space: ElasticSpace | None = None) -> ElasticMoE:
    """Read a local Mixtral or Qwen3-MoE folder (safetensors only) into an ElasticMoE (float32).

    Nothing from the folder is executed: config.json is parsed as JSON and weights are read with
    safetensors after every key and shape has been checked against the config. `space`, if given,
    is validated against the imported architecture. Saving (`checkpoint.save_model`) is the caller's.
    """
    from safetensors import safe_open

    folder = Path(hf_dir)
    if not folder.is_dir():
        raise HFError(f"{folder} is not a folder")
    _refuse_unsafe_files(folder)
    model_type, config = read_hf_config(folder)
    headers = _read_headers(_weight_files(folder))
    _check_headers(headers, expected_shapes(config, model_type), config.tie_embeddings)
    if space is not None:
        space.validate(config)

    handles: dict[Path, Any] = {}

    def load(key: str) -> torch.Tensor:
        f = headers[key][0]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(key).to(torch.float32)

    try:
        state = _our_state(model_type, config, load)
        if config.tie_embeddings and "lm_head.weight" in headers:
            if not torch.equal(load("lm_head.weight"), state["embed.weight"]):
                raise HFError(f"{folder}: tie_word_embeddings is true but lm_head.weight differs from the embeddings")
    finally:
        handles.clear()
    model = ElasticMoE(config)
    model.load_state_dict(state, strict=True, assign=True)
    log.info("imported %s from %s: %d params", ARCHITECTURES[model_type], folder, model.num_params())
    return model


__all__ = [
    "ARCHITECTURES",
    "HFError",
    "architecture_for",
    "expected_shapes",
    "export_hf",
    "hf_config",
    "hf_state_dict",
    "import_hf",
    "max_logit_diff_hf",
    "read_hf_config",
]
