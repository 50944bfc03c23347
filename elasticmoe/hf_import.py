"""Import of a local Hugging Face Mixtral / Qwen3-MoE folder as an elastic parent: safetensors
only, every header checked against config.json before a tensor is read, nothing from the folder
executed (conventions and key names: `elasticmoe.hf`)."""

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
    DEFAULT_EPS,
    DEFAULT_THETA,
    FLOAT_DTYPES,
    GLOBAL_KEYS,
    HEAD_KEY,
    IGNORABLE_SUFFIXES,
    LAYER_KEYS,
    MIXTRAL,
    PICKLE_SUFFIXES,
    QK_NORM_KEYS,
    QWEN3_MOE,
    HFError,
    _expert_keys,
    _router_key,
    expected_shapes,
)
from .model import ElasticMoE

log = logging.getLogger(__name__)


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
    _check_size(config, headers)
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
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
        raise HFError(f"{folder}: weights hold NaN or infinite values ({shown}); nothing was imported")
    model = ElasticMoE(config)
    model.load_state_dict(state, strict=True, assign=True)
    log.info("imported %s from %s: %d params", ARCHITECTURES[model_type], folder, model.num_params())
    return model


__all__ = ["import_hf", "read_hf_config"]
