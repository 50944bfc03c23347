"""Import of a local Hugging Face Mixtral / Qwen3-MoE / OLMoE / Qwen2-MoE / ERNIE-4.5-MoE / GLM-4.5
MoE folder as an elastic parent: safetensors only, every header checked against config.json before
a tensor is read, nothing from the folder executed (conventions and key names: `elasticmoe.hf`).
The model records its source class (`ModelConfig.source_architecture`), so it and its children
export back to it."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from .checkpoint import check_weights_fit
from .config import ConfigError, ElasticSpace, ModelConfig
from .hf import (
    ARCHITECTURES,
    ERNIE,
    FLOAT_DTYPES,
    GLM,
    GLOBAL_KEYS,
    HEAD_KEY,
    IGNORABLE_SUFFIXES,
    MIXTRAL,
    OLMOE,
    PAIR_ROPE,
    PICKLE_SUFFIXES,
    QK_NORM_OF,
    QWEN2_MOE,
    QWEN3_MOE,
    ROUTER_BIAS_KEY,
    HFError,
    _expert_keys,
    expected_shapes,
    layer_keys,
)
from .model import ElasticMoE, rope_rows_from_pairs

log = logging.getLogger(__name__)

# transformers' config defaults (5.x dataclasses) for the fields a config.json may leave out
_COMMON = {"rope_theta": 10_000.0, "use_sliding_window": False, "tie_word_embeddings": False}
DEFAULTS: dict[str, dict[str, Any]] = {
    MIXTRAL: {
        **_COMMON,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1_000_000.0,
        "use_sliding_window": True,  # Mixtral has no switch: a sliding_window below the context applies
        "num_experts": 8,  # named num_local_experts in Mixtral
        "num_experts_per_tok": 2,
        "intermediate_size": 14336,
        "norm_topk_prob": True,  # not a Mixtral field: it always renormalises
    },
    QWEN3_MOE: {
        **_COMMON,
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": False,
    },
    OLMOE: {
        **_COMMON,
        "hidden_size": 2048,
        "num_attention_heads": 16,
        "num_key_value_heads": None,  # = heads
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "intermediate_size": 2048,
        "norm_topk_prob": False,
    },
    QWEN2_MOE: {
        **_COMMON,
        "hidden_size": 2048,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "qkv_bias": True,  # transformers 4.x has no switch: q/k/v always have biases
        "norm_topk_prob": False,
    },
    ERNIE: {
        **_COMMON,
        "hidden_size": 2560,
        "num_attention_heads": 20,
        "num_key_value_heads": 4,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500_000.0,
        "tie_word_embeddings": True,
        "num_experts": 64,  # named moe_num_experts in ERNIE
        "num_experts_per_tok": 6,  # named moe_k
        "moe_intermediate_size": 1536,
        "intermediate_size": 12288,
        "moe_num_shared_experts": 2,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": -1,
        "moe_layer_interval": 1,
        "moe_norm_min": 1e-12,
        "norm_topk_prob": True,  # not an ERNIE field: it always renormalises
    },
    GLM: {
        **_COMMON,
        "hidden_size": 4096,
        "num_attention_heads": 96,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "num_experts": 128,  # named n_routed_experts in GLM
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 1408,
        "intermediate_size": 10944,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "use_qk_norm": False,
        "attention_bias": False,
        "partial_rotary_factor": 0.5,  # what transformers sets when rope_parameters leaves it out
        "num_nextn_predict_layers": 1,
    },
}
WIDTH_KEY = {
    MIXTRAL: "intermediate_size",
    QWEN3_MOE: "moe_intermediate_size",
    OLMOE: "intermediate_size",
    QWEN2_MOE: "moe_intermediate_size",
    ERNIE: "moe_intermediate_size",
    GLM: "moe_intermediate_size",
}
# their names -> the common ones
RENAMES = {
    ERNIE: {"moe_num_experts": "num_experts", "moe_k": "num_experts_per_tok"},
    GLM: {"n_routed_experts": "num_experts", "num_mtp_layers": "num_nextn_predict_layers"},
}


def _refuse_unsafe_files(folder: Path) -> None:
    root = folder.resolve()
    leaving = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_symlink() and not p.resolve().is_relative_to(root)
    )
    if leaving:
        raise HFError(
            f"{folder} holds symbolic links to files outside it {leaving}: they would be copied into the run and "
            "every export. Replace them by the files themselves"
        )
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


def _rope_theta(raw: dict[str, Any], defaults: dict[str, Any], p: list[str]) -> tuple[float, Any]:
    """(theta, partial_rotary_factor) of plain RoPE; anything else is a problem in `p`."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        p.append(f"rope_parameters={params!r} must be a mapping")
        return 0.0, 1.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        p.append(f"rope_type={rope_type!r}: only plain RoPE ('default') is supported, no scaling")
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    partial = defaults.get("partial_rotary_factor", 1.0) if partial is None else partial
    if partial != 1.0 and "partial_rotary_factor" not in defaults:
        p.append(f"partial_rotary_factor={partial}: only full-head RoPE is supported")
    theta = params.get("rope_theta", raw.get("rope_theta", defaults["rope_theta"]))
    return (float(theta) if isinstance(theta, (int, float)) else theta), partial


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HFError(f"{path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HFError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise HFError(f"{path}: top level must be a mapping")
    return raw


def _model_type(raw: dict[str, Any], path: Path) -> str:
    """The architecture of a config.json, or one line naming it and the supported ones."""
    supported = ", ".join(f"{cls} ({t})" for t, cls in ARCHITECTURES.items())
    if "auto_map" in raw or raw.get("trust_remote_code"):
        raise HFError(
            f"{path} has auto_map / trust_remote_code: the folder asks to run its own Python code. "
            f"Only stock architectures are imported ({supported}), and no code from a folder is run"
        )
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        named = f" ({', '.join(map(str, raw['architectures']))})" if isinstance(raw.get("architectures"), list) else ""
        raise HFError(f"{path}: model_type={model_type!r}{named} is not supported; supported: {supported}")
    return model_type


def _refusals(raw: dict[str, Any], model_type: str, get) -> list[str]:
    """Every setting of config.json that our block cannot reproduce exactly."""
    p: list[str] = []
    arch = raw.get("architectures") or [ARCHITECTURES[model_type]]
    if arch != [ARCHITECTURES[model_type]]:
        p.append(f"architectures={arch}: expected [{ARCHITECTURES[model_type]!r}]")
    if raw.get("quantization_config"):
        p.append("quantization_config is set: quantized weights are not supported")
    if raw.get("hidden_act", "silu") not in ("silu", "swish"):
        p.append(f"hidden_act={raw.get('hidden_act')!r}: experts must be SwiGLU (silu)")
    if (raw.get("attention_bias") and model_type != GLM) or raw.get("mlp_bias"):
        p.append("attention_bias / mlp_bias is true: our projections have no biases (only Qwen2-MoE's q/k/v)")
    if model_type == GLM and (get("n_group"), get("topk_group")) != (1, 1):
        p.append(
            f"n_group={get('n_group')}, topk_group={get('topk_group')}: group-limited top-k is not supported "
            "(GLM-4.5's released models use one group)"
        )
    if model_type != QWEN2_MOE and raw.get("qkv_bias"):
        p.append(f"qkv_bias is true: {ARCHITECTURES[model_type]} has no q/k/v biases")
    if raw.get("clip_qkv") is not None:
        p.append(f"clip_qkv={raw['clip_qkv']}: clamped q/k/v are not supported")
    window, max_len = raw.get("sliding_window"), get("max_position_embeddings")
    if get("use_sliding_window") and window and isinstance(max_len, int) and window < max_len:
        p.append(
            f"sliding_window={window} < max_position_embeddings={max_len}: only full causal attention is supported"
        )
    if any(t != "full_attention" for t in raw.get("layer_types") or []):
        p.append(f"layer_types={raw['layer_types']}: only full causal attention is supported")
    if "num_local_experts" in raw and "num_experts" in raw and raw["num_local_experts"] != raw["num_experts"]:
        p.append(f"num_local_experts={raw['num_local_experts']} and num_experts={raw['num_experts']} disagree")
    if raw.get("decoder_sparse_step", 1) != 1 or raw.get("mlp_only_layers"):
        p.append(
            f"decoder_sparse_step={raw.get('decoder_sparse_step', 1)}, mlp_only_layers="
            f"{raw.get('mlp_only_layers')}: this model has dense (non-MoE) layers, which our block lacks"
        )
    shared = get("shared_expert_intermediate_size")
    if model_type == ERNIE and raw.get("use_bias"):
        p.append("use_bias is true: biases on every projection and the LM head are not supported")
    if model_type == QWEN2_MOE and not (isinstance(shared, int) and shared > 0):
        p.append(f"shared_expert_intermediate_size={shared!r}: a Qwen2-MoE layer without a shared expert")
    if model_type != QWEN2_MOE and shared:
        p.append("shared_expert_intermediate_size is set: this architecture has no shared expert")
    return p


def _head_dim(raw: dict[str, Any], model_type: str, get, p: list[str]) -> Any:
    """head_dim as transformers reads it: stated (Mixtral, Qwen3-MoE) or hidden_size / heads."""
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    derived = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None
    if model_type in (MIXTRAL, QWEN3_MOE, ERNIE, GLM):
        return raw.get("head_dim") or derived
    if derived is not None and hidden % heads:
        p.append(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    if raw.get("head_dim") not in (None, derived):
        p.append(f"head_dim={raw['head_dim']}: {ARCHITECTURES[model_type]} derives hidden_size / heads = {derived}")
    return derived


def read_hf_config(folder: str | Path) -> tuple[str, ModelConfig]:
    """(model_type, ModelConfig) from a transformers config.json, read as plain JSON.

    Raises HFError listing every setting our block cannot reproduce exactly.
    """
    path = Path(folder) / "config.json"
    raw = _read_json(path)
    model_type = _model_type(raw, path)
    defaults = DEFAULTS[model_type]
    renames = RENAMES.get(model_type, {})
    raw = {**raw, **{ours: raw[theirs] for theirs, ours in renames.items() if theirs in raw}}

    def get(key: str) -> Any:
        return raw.get(key, defaults.get(key))

    p = _refusals(raw, model_type, get)
    head_dim = _head_dim(raw, model_type, get, p)
    theta, partial = _rope_theta(raw, defaults, p)
    if p:
        raise HFError(f"{path} cannot be imported exactly: " + "; ".join(p))
    heads = get("num_attention_heads")
    fields = dict(
        vocab_size=raw.get("vocab_size"),
        d_model=get("hidden_size"),
        layers=raw.get("num_hidden_layers"),
        heads=heads,
        kv_heads=get("num_key_value_heads") or heads,
        head_dim=head_dim,
        experts=raw.get("num_local_experts", get("num_experts")),  # 5.x writes the former for all four
        top_k=get("num_experts_per_tok"),
        expert_width=get(WIDTH_KEY[model_type]),
        rope_theta=theta,
        norm_eps=get("rms_norm_eps"),
        max_seq_len=get("max_position_embeddings"),
        tie_embeddings=bool(get("tie_word_embeddings")),
        qk_norm=QK_NORM_OF[model_type] is not None and (model_type != GLM or bool(get("use_qk_norm"))),
        qk_norm_scope=QK_NORM_OF[model_type] or "head",
        qkv_bias=bool(get("qkv_bias") if model_type == QWEN2_MOE else model_type == GLM and get("attention_bias")),
        renormalize_top_k=bool(get("norm_topk_prob")),
        shared_expert_width=get("shared_expert_intermediate_size") if model_type == QWEN2_MOE else 0,
        shared_expert_gate=model_type == QWEN2_MOE,
        source_architecture=ARCHITECTURES[model_type],
    )
    if model_type == ERNIE:
        fields.update(_ernie_fields(get, raw.get("num_hidden_layers"), p))
    if model_type == GLM:
        fields.update(_glm_fields(get, raw.get("num_hidden_layers"), head_dim, partial, p))
    if p:
        raise HFError(f"{path} cannot be imported exactly: " + "; ".join(p))
    try:
        return model_type, ModelConfig(**fields)
    except ConfigError as exc:
        raise HFError(f"{path} describes a model our config rejects: {exc}") from None


def _ernie_fields(get, layers: Any, p: list[str]) -> dict[str, Any]:
    """ERNIE-4.5-MoE's dense layers, shared experts and router, as transformers builds them: layer i
    is MoE iff (i + 1) % moe_layer_interval == 0 and start <= i <= end (end -1: the last layer);
    the shared experts are one SwiGLU of moe_num_shared_experts x moe_intermediate_size; the router
    chooses on probabilities + e_score_correction_bias and renormalises over max(sum, moe_norm_min)."""
    names = ("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval", "moe_num_shared_experts")
    start, end, interval, shared = (get(k) for k in names)
    bad = [f"{k}={v!r}" for k, v in zip(names, (start, end, interval, shared)) if not isinstance(v, int)]
    if isinstance(interval, int) and interval < 1:
        bad.append(f"moe_layer_interval={interval} (at least 1)")
    if isinstance(shared, int) and shared < 0:
        bad.append(f"moe_num_shared_experts={shared} (at least 0)")
    if bad or not isinstance(layers, int) or not isinstance(get("moe_intermediate_size"), int):
        p.append("ERNIE-4.5 MoE fields must be integers: " + ", ".join(bad))
        return {}
    end = layers - 1 if end == -1 else end
    dense = tuple(i for i in range(max(0, min(layers, 1 << 16))) if not ((i + 1) % interval == 0 and start <= i <= end))
    return dict(
        dense_layers=dense,
        dense_width=get("intermediate_size") if dense else 0,
        shared_expert_width=shared * get("moe_intermediate_size"),
        shared_expert_gate=False,
        router_bias=True,
        renormalize_min=get("moe_norm_min"),
    )


def _glm_fields(get, layers: Any, head_dim: Any, partial: Any, p: list[str]) -> dict[str, Any]:
    """GLM-4.5 MoE as transformers builds it: the first `first_k_dense_replace` layers dense, shared
    experts of n_shared_experts x moe_intermediate_size, a sigmoid router choosing on scores +
    e_score_correction_bias, renormalised over sum + 1e-20 when norm_topk_prob, scaled by
    routed_scaling_factor; RoPE on the first int(head_dim x partial_rotary_factor) dims of a head."""
    names = ("first_k_dense_replace", "n_shared_experts", "moe_intermediate_size")
    first, shared, width = (get(k) for k in names)
    bad = [f"{k}={v!r}" for k, v in zip(names, (first, shared, width)) if not isinstance(v, int) or v < 0]
    if not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        bad.append(f"partial_rotary_factor={partial!r}")
    if bad or not isinstance(layers, int) or not isinstance(head_dim, int):
        p.append("GLM-4.5 fields must be non-negative integers, partial_rotary_factor in (0, 1]: " + ", ".join(bad))
        return {}
    dense = tuple(range(min(first, layers, 1 << 16)))
    rotary = int(head_dim * partial)
    return dict(
        dense_layers=dense,
        dense_width=get("intermediate_size") if dense else 0,
        shared_expert_width=shared * width,
        shared_expert_gate=False,
        router_bias=True,
        router_score="sigmoid",
        routed_scale=get("routed_scaling_factor"),
        renormalize_eps=1e-20 if get("norm_topk_prob") else 0.0,
        rope_dims=0 if rotary == head_dim else rotary,
    )


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


def _check_size(config: ModelConfig, headers: dict) -> None:
    """Refuse a config.json that describes more than the weight files hold, before anything of
    that size is built (`num_hidden_layers: 1e7` must be an error, not an allocation)."""
    c = config
    held = sum(math.prod(shape) for _, shape, _ in headers.values())
    check_weights_fit(c, held, "config.json", unit="values", error=HFError)
    layers_held = {k.split(".")[2] for k in headers if k.startswith("model.layers.") and k.count(".") > 2}
    if c.layers > len(layers_held):
        raise HFError(
            f"config.json describes {c.layers} layers, but the weight files hold {len(layers_held)}: "
            "config.json does not describe these weights"
        )


def mtp_keys(folder: Path, model_type: str, layers: int):
    """Which keys hold a multi-token-prediction module, which transformers skips when loading and
    the import leaves out too: GLM-4.5's `num_nextn_predict_layers` layers after the last one,
    ERNIE-4.5's keys naming `mtp`."""
    if model_type == ERNIE:
        return lambda key: "mtp" in key
    if model_type != GLM:
        return lambda key: False
    raw = _read_json(folder / "config.json")
    n = raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers", DEFAULTS[GLM]["num_nextn_predict_layers"]))
    n = n if isinstance(n, int) and 0 <= n <= 64 else 0
    prefixes = tuple(f"model.layers.{i}." for i in range(layers, layers + n))
    return lambda key: key.startswith(prefixes) if prefixes else False


def _check_headers(headers: dict, expected: dict[str, tuple[int, ...]], tied: bool, skipped=lambda key: False) -> None:
    p: list[str] = []
    extra = [
        k
        for k in headers
        if k not in expected
        and not k.endswith(IGNORABLE_SUFFIXES)
        and not (tied and k == "lm_head.weight")
        and not skipped(k)
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


class _Reader:
    """Tensors of safetensors files read with plain reads into memory we own, in a chosen dtype.

    No memory map: the pages of a mapped file count as resident for as long as it is mapped, so
    reading a model through one doubles the peak (the mapped file plus our copy). Offsets come
    from each file's JSON header (which `_read_headers` had safetensors validate); a stacked
    expert tensor is filled slice by slice, with no per-expert temporary when the dtypes agree."""

    def __init__(self, headers: dict[str, tuple[Path, tuple[int, ...], str]], dtype: torch.dtype):
        self.headers, self.dtype = headers, dtype
        self.spans: dict[Path, tuple[int, dict]] = {}
        self.files: dict[Path, Any] = {}

    def _span(self, key: str) -> tuple[Any, int, int]:
        path = self.headers[key][0]
        if path not in self.spans:
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            self.spans[path] = (8 + n, {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"})
            self.files[path] = open(path, "rb")  # closed by close()
        start, offsets = self.spans[path]
        begin, end = offsets[key]
        return self.files[path], start + begin, end - begin

    def into(self, key: str, out: torch.Tensor) -> None:
        """Fill the contiguous tensor `out` (the key's shape) with the key's values."""
        _, shape, dtype = self.headers[key]
        if FLOAT_DTYPES[dtype] != out.dtype:
            out.copy_(self.load(key, FLOAT_DTYPES[dtype]))
            return
        fh, at, size = self._span(key)
        if size != out.nbytes:
            raise HFError(f"tensor {key}: the file holds {size} bytes for {list(shape)} {dtype}")
        fh.seek(at)
        if fh.readinto(memoryview(out.view(torch.uint8).reshape(-1).numpy())) != size:
            raise HFError(f"tensor {key}: {fh.name} ends before its data")

    def load(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        _, shape, source = self.headers[key]
        out = torch.empty(shape, dtype=FLOAT_DTYPES[source])
        self.into(key, out)
        return out.to(dtype or self.dtype)

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()
        self.files.clear()


def _our_state(model_type: str, config: ModelConfig, read: _Reader) -> dict[str, torch.Tensor]:
    """Our state dict read from transformers' keys (inverse of `hf_state_dict`), layer by layer;
    each stacked expert tensor is allocated once and filled in place."""
    c = config
    state = {k: read.load(hf) for k, hf in GLOBAL_KEYS.items()}
    if not c.tie_embeddings:
        state[HEAD_KEY[0]] = read.load(HEAD_KEY[1])
    for i in range(c.layers):
        per_layer = layer_keys(c, model_type, c.is_dense(i))
        for k, hf in per_layer.items():
            key = f"model.layers.{i}.{hf}"
            float32_router = k == "moe.router.weight" and read.headers[key][2] == "F32"  # as the source computes it
            state[f"blocks.{i}.{k}"] = read.load(key, torch.float32 if float32_router else None)
        if model_type in PAIR_ROPE:  # adjacent-pair RoPE rows -> our rotate-half rows (an exact permutation)
            for name, heads in (("q_proj", c.heads), ("k_proj", c.kv_heads)):
                key = f"blocks.{i}.attn.{name}.weight"
                state[key] = rope_rows_from_pairs(state[key], heads).contiguous()
        if c.is_dense(i):
            continue
        if c.router_bias:  # kept in float32, as transformers keeps it
            bias = read.load(f"model.layers.{i}.{ROUTER_BIAS_KEY[model_type][0]}", torch.float32)
            state[f"blocks.{i}.moe.router_bias"] = bias.reshape(-1)
        keys = [_expert_keys(model_type, i, e) for e in range(c.layer_shape(i)[0])]
        for n, name in enumerate(("w_gate", "w_up", "w_down")):
            stacked = torch.empty((len(keys), *read.headers[keys[0][n]][1]), dtype=read.dtype)
            for e, k in enumerate(keys):
                read.into(k[n], stacked[e])
            state[f"blocks.{i}.moe.{name}"] = stacked
    return state


def source_tokenizer(hf_dir: str | Path, vocab_size: int) -> Path | None:
    """The folder's tokenizer.json, checked before anything is written (it parses, is at most
    64 MiB and its ids fit the embedding), or None when the folder has none."""
    from .tokenizer import read_tokenizer_file

    tok = Path(hf_dir) / "tokenizer.json"
    if not tok.is_file():
        return None
    n = read_tokenizer_file(tok).get_vocab_size()
    if n > vocab_size:
        raise HFError(f"{tok} has {n} ids but the model's vocab_size is {vocab_size}")
    return tok


ROUTER_SUFFIXES = (".gate.weight", "e_score_correction_bias")  # routers and their selection biases


def _source_dtype(headers: dict, expected: dict) -> torch.dtype:
    """The dtype every weight shares (bf16 stays bf16: no float32 copy of the model is made), or
    float32 when the files mix dtypes. Routers and selection biases do not count: ERNIE-4.5 and
    GLM-4.5 keep them in float32 beside bf16 weights, and so do we (`_our_state`)."""
    found = {headers[k][2] for k in expected if k in headers and not k.endswith(ROUTER_SUFFIXES)}
    return FLOAT_DTYPES[found.pop()] if len(found) == 1 else torch.float32


def import_hf(hf_dir: str | Path, space: ElasticSpace | None = None, dtype: torch.dtype | None = None) -> ElasticMoE:
    """Read a local Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE, ERNIE-4.5-MoE or GLM-4.5 MoE folder
    (safetensors) into an ElasticMoE.

    Nothing from the folder is executed: config.json is parsed as JSON and weights are read after
    every key and shape has been checked against the config. The model keeps the files' dtype
    (`dtype` to choose another; float32 when they mix dtypes) and is built without an initialised
    copy of its own: its parameters are the tensors read, each once (peak memory about the model's
    size in that dtype; `bench/ELASTIFY.md`). `space`, if given, is validated against the imported
    architecture. Saving (`checkpoint.save_model`) is the caller's; `checkpoint.load_model` gives
    float32 again for training on the CPU.
    """
    from .model import rope_inv_freq

    folder = Path(hf_dir)
    if not folder.is_dir():
        raise HFError(f"{folder} is not a folder")
    _refuse_unsafe_files(folder)
    model_type, config = read_hf_config(folder)
    headers = _read_headers(_weight_files(folder))
    _check_size(config, headers)
    expected = expected_shapes(config, model_type)
    skipped = mtp_keys(folder, model_type, config.layers)
    _check_headers(headers, expected, config.tie_embeddings, skipped)
    if any(skipped(k) for k in headers if k not in expected):
        log.info("%s: its multi-token-prediction layer(s) are left out (transformers skips them too)", folder)
    if space is not None:
        space.validate(config)
    read = _Reader(headers, dtype or _source_dtype(headers, expected))
    try:
        state = _our_state(model_type, config, read)
        if config.tie_embeddings and "lm_head.weight" in headers:
            if not torch.equal(read.load("lm_head.weight"), state["embed.weight"]):
                raise HFError(f"{folder}: tie_word_embeddings is true but lm_head.weight differs from the embeddings")
    finally:
        read.close()
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        raise HFError(f"{folder}: weights hold NaN or infinite values ({shown}); nothing was imported")
    with torch.device("meta"):  # the structure only: the parameters are the tensors just read
        model = ElasticMoE(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(config)
    log.info("imported %s from %s: %d params", ARCHITECTURES[model_type], folder, model.num_params())
    return model


__all__ = ["import_hf", "read_hf_config", "source_tokenizer"]
