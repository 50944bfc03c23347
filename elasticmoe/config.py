"""Configuration dataclasses: the parent architecture and the elastic space.

Layer 0 of the package: no torch. Every dataclass here validates itself on construction,
reports *all* problems at once, and round-trips through plain dicts (JSON / YAML / TOML).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration or sub-network spec is invalid. The message names every bad field."""


def _check(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


def _from_dict(cls, data: dict[str, Any], where: str):
    """Build dataclass `cls` from `data`, refusing unknown keys (named, with the allowed set)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            value = data[f.name]
            if isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
    p = [f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}"] if unknown else []
    try:  # validate the known fields too, so every problem is reported at once
        obj = cls(**kwargs)
    except ConfigError as exc:
        p.append(str(exc))
    _check(p)
    return obj


def _int_in(problems: list[str], name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        problems.append(f"{name}={value!r} must be an integer")
    elif value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        problems.append(f"{name}={value} is out of range; allowed {rng}")


def check_number(
    problems: list[str],
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    integer: bool = False,
    lo_open: bool = False,
    hi_open: bool = False,
) -> bool:
    """Append a problem unless `value` is a finite number (an integer when `integer`; never a
    boolean) in the interval from `lo` to `hi` (open ends when `lo_open` / `hi_open`). True if fine."""
    kind = "an integer" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        problems.append(f"{name}={value!r} must be {kind}")
        return False
    if not math.isfinite(value):
        problems.append(f"{name}={value!r} must be {kind}")
        return False
    low_ok = lo is None or (value > lo if lo_open else value >= lo)
    high_ok = hi is None or (value < hi if hi_open else value <= hi)
    if not (low_ok and high_ok):
        left = "any" if lo is None else f"{'(' if lo_open else '['}{lo}"
        right = "any" if hi is None else f"{hi}{')' if hi_open else ']'}"
        problems.append(f"{name}={value!r} is out of range; allowed {left}, {right}".replace("any, any", "any"))
        return False
    return True


def check_type(problems: list[str], name: str, value: Any, kind: type, of: type | None = None) -> bool:
    """Append a problem unless `value` is a `kind` (a tuple/dict whose items are `of`, when given)."""
    names = {str: "a string", bool: "true or false", tuple: "a list", dict: "a mapping"}
    ok = isinstance(value, kind)
    if ok and of is not None:
        items = value.values() if isinstance(value, dict) else value
        ok = all(isinstance(v, of) and not (of is not bool and isinstance(v, bool)) for v in items)
        if ok and isinstance(value, dict):
            ok = all(isinstance(k, str) for k in value)
    if not ok:
        what = names.get(kind, kind.__name__) + (f" of {names.get(of, of.__name__)}s" if of is not None else "")
        problems.append(f"{name}={value!r} must be {what}")
    return ok


QK_NORM_SCOPES = ("head", "all")  # RMSNorm over each head (Qwen3-MoE) or the whole projection (OLMoE)
# ModelConfig fields written only when they differ from their default (see ModelConfig).
IMPORT_OPTIONS = (
    "qk_norm_scope",
    "qkv_bias",
    "renormalize_top_k",
    "shared_expert_gate",
    "source_architecture",
    "dense_layers",
    "dense_width",
    "router_bias",
    "renormalize_min",
    "router_score",
    "routed_scale",
    "renormalize_eps",
    "rope_dims",
)
ROUTER_SCORES = ("softmax", "sigmoid")  # over the experts (most), or per expert (GLM-4.5, DeepSeek-V3)


@dataclass(frozen=True)
class ModelConfig:
    """The parent (or a child) architecture.

    The block follows Mixtral / Qwen3-MoE: pre-RMSNorm, RoPE (rotate-half convention),
    grouped-query attention, softmax router whose top-k probabilities are renormalised to sum
    to one, SwiGLU experts. `qk_norm=True` adds Qwen3's per-head RMSNorm on queries and keys;
    `shared_expert_width > 0` adds an always-on SwiGLU expert (never cut by a sub-network).

    Options for imported architectures (their defaults are the block above, and `to_dict` leaves
    them out while they hold their default, so existing config files stay byte-identical):
    `qk_norm_scope="all"` normalises the whole query / key projection instead of each head
    (OLMoE); `qkv_bias` adds biases to the query, key and value projections (Qwen2-MoE);
    `renormalize_top_k=False` weights each chosen expert by its softmax probability as it is
    (OLMoE, Qwen2-MoE: `norm_topk_prob: false`); `shared_expert_gate` scales the shared expert
    by `sigmoid(g . x)` per token (Qwen2-MoE); `source_architecture` is the transformers class the
    model was imported from (e.g. "OlmoeForCausalLM"), which its exports (children included) use.
    ERNIE-4.5-MoE: `dense_layers` are the layer indices whose feed-forward is one dense SwiGLU of
    `dense_width` instead of the MoE (kept whole by sub-networks: their specs' experts, top-k and
    width do not apply); `router_bias` adds a per-expert bias to the probabilities for choosing
    the top-k only (`e_score_correction_bias`; the weights stay the unbiased probabilities);
    `renormalize_min` floors the renormalisation's denominator (`moe_norm_min`; 0: no floor).
    GLM-4.5 MoE: `router_score="sigmoid"` scores each expert by `sigmoid(logit)` instead of a
    softmax over the experts; `renormalize_eps` is added to the renormalisation's denominator
    (GLM: 1e-20); `routed_scale` multiplies the routed experts' weights (`routed_scaling_factor`);
    `rope_dims` rotates only the first `rope_dims` dims of each head (partial RoPE; 0: all).
    """

    vocab_size: int = 2048
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    experts: int = 8
    top_k: int = 2
    expert_width: int = 256
    shared_expert_width: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 512
    tie_embeddings: bool = False
    qk_norm: bool = False
    qk_norm_scope: str = "head"
    qkv_bias: bool = False
    renormalize_top_k: bool = True
    shared_expert_gate: bool = False
    source_architecture: str = ""
    dense_layers: tuple[int, ...] = ()
    dense_width: int = 0
    router_bias: bool = False
    renormalize_min: float = 0.0
    router_score: str = "softmax"
    routed_scale: float = 1.0
    renormalize_eps: float = 0.0
    rope_dims: int = 0
    # Per-layer (experts, top_k, expert_width), only for children extracted from a per-layer
    # sub-network; empty means every layer has (experts, top_k, expert_width).
    layer_shapes: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "layer_shapes", tuple(tuple(s) if isinstance(s, (list, tuple)) else s for s in self.layer_shapes)
        )
        if isinstance(self.dense_layers, list):
            object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        p: list[str] = []
        _int_in(p, "vocab_size", self.vocab_size, 2)
        _int_in(p, "d_model", self.d_model, 1)
        _int_in(p, "layers", self.layers, 1)
        _int_in(p, "heads", self.heads, 1)
        _int_in(p, "kv_heads", self.kv_heads, 1, self.heads if isinstance(self.heads, int) else None)
        _int_in(p, "head_dim", self.head_dim, 2)
        _int_in(p, "experts", self.experts, 1)
        _int_in(p, "top_k", self.top_k, 1, self.experts if isinstance(self.experts, int) else None)
        _int_in(p, "expert_width", self.expert_width, 1)
        _int_in(p, "shared_expert_width", self.shared_expert_width, 0)
        _int_in(p, "max_seq_len", self.max_seq_len, 1)
        # Cross-field checks run whenever their own fields are valid, so all problems show at once.
        if not any(q.startswith(("heads=", "kv_heads=")) for q in p) and self.heads % self.kv_heads:
            p.append(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if not any(q.startswith("head_dim=") for q in p) and self.head_dim % 2:
            p.append(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        check_number(p, "rope_theta", self.rope_theta, 0, lo_open=True)
        check_number(p, "norm_eps", self.norm_eps, 0, 1, lo_open=True, hi_open=True)
        if self.layer_shapes and not p:
            if len(self.layer_shapes) != self.layers:
                p.append(f"layer_shapes has {len(self.layer_shapes)} entries; expected layers={self.layers}")
            for i, shape in enumerate(self.layer_shapes):
                if not isinstance(shape, tuple) or len(shape) != 3:
                    p.append(f"layer_shapes[{i}]={shape!r} must be [experts, top_k, width]")
                    continue
                e, k, w = shape
                _int_in(p, f"layer_shapes[{i}] experts", e, 1, self.experts)
                _int_in(p, f"layer_shapes[{i}] top_k", k, 1, min(e, self.experts) if isinstance(e, int) else None)
                _int_in(p, f"layer_shapes[{i}] width", w, 1, self.expert_width)
        self._check_dense(p)
        check_number(p, "renormalize_min", self.renormalize_min, 0, 1, hi_open=True)
        check_number(p, "renormalize_eps", self.renormalize_eps, 0, 1, hi_open=True)
        check_number(p, "routed_scale", self.routed_scale, 0, lo_open=True)
        if self.router_score not in ROUTER_SCORES:
            p.append(f"router_score={self.router_score!r} must be one of {list(ROUTER_SCORES)}")
        head_dim = self.head_dim if isinstance(self.head_dim, int) else None
        _int_in(p, "rope_dims", self.rope_dims, 0, head_dim)
        if isinstance(self.rope_dims, int) and self.rope_dims % 2:
            p.append(f"rope_dims={self.rope_dims} must be even (RoPE rotates pairs)")
        for name in ("tie_embeddings", "qk_norm", "qkv_bias", "renormalize_top_k", "shared_expert_gate", "router_bias"):
            if not isinstance(getattr(self, name), bool):
                p.append(f"{name}={getattr(self, name)!r} must be true or false")
        if self.qk_norm_scope not in QK_NORM_SCOPES:
            p.append(f"qk_norm_scope={self.qk_norm_scope!r} must be one of {list(QK_NORM_SCOPES)}")
        if self.shared_expert_gate is True and self.shared_expert_width == 0:
            p.append("shared_expert_gate=true needs a shared expert (shared_expert_width > 0)")
        check_type(p, "source_architecture", self.source_architecture, str)
        _check(p)

    def _check_dense(self, p: list[str]) -> None:
        _int_in(p, "dense_width", self.dense_width, 0)
        if not check_type(p, "dense_layers", self.dense_layers, tuple, int):
            return
        layers = self.layers if isinstance(self.layers, int) else 0
        bad = [i for i in self.dense_layers if not 0 <= i < layers]
        if bad:
            p.append(f"dense_layers has indices {bad} outside [0, {layers - 1}]")
        if list(self.dense_layers) != sorted(set(self.dense_layers)):
            p.append(f"dense_layers={list(self.dense_layers)} must be strictly increasing")
        if isinstance(self.dense_width, int) and bool(self.dense_layers) != (self.dense_width > 0):
            p.append(
                f"dense_layers={list(self.dense_layers)} and dense_width={self.dense_width}: a dense width "
                "is given exactly when there are dense layers"
            )

    @property
    def rotary_dims(self) -> int:
        """How many leading dims of each head RoPE rotates."""
        return self.rope_dims or self.head_dim

    def is_dense(self, i: int) -> bool:
        """Whether layer i's feed-forward is a dense SwiGLU (kept whole) instead of the MoE."""
        return i in self.dense_layers

    def layer_shape(self, i: int) -> tuple[int, int, int]:
        """(experts, top_k, expert_width) of layer i."""
        return self.layer_shapes[i] if self.layer_shapes else (self.experts, self.top_k, self.expert_width)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_shapes"] = [list(s) for s in self.layer_shapes]
        d["dense_layers"] = list(self.dense_layers)
        defaults = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default for f in fields(self)}
        return {k: v for k, v in d.items() if k not in IMPORT_OPTIONS or v != defaults[k]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data, "model")


@dataclass(frozen=True)
class ElasticSpace:
    """What may shrink and to what. Values are uniform choices offered to every kept layer.

    depths: allowed numbers of kept layers; experts: allowed numbers of kept experts per layer
    (a prefix of the importance-ordered experts); top_ks: allowed routing top-k; widths: allowed
    expert hidden widths (a prefix of the importance-ordered neurons).
    """

    depths: tuple[int, ...] = ()
    experts: tuple[int, ...] = ()
    top_ks: tuple[int, ...] = ()
    widths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("depths", "experts", "top_ks", "widths"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                try:
                    value = tuple(sorted(set(value)))
                except TypeError:  # mixed or unhashable entries: keep them for validate() to name
                    value = tuple(value)
                object.__setattr__(self, name, value)

    def validate(self, config: ModelConfig) -> None:
        """Raise ConfigError naming every value that the parent `config` cannot provide."""
        p: list[str] = []
        limits = {
            "depths": config.layers,
            "experts": config.experts,
            "top_ks": config.top_k,
            "widths": config.expert_width,
        }
        for name, hi in limits.items():
            values = getattr(self, name)
            if not isinstance(values, tuple) or not values:
                p.append(f"space.{name} must be a non-empty list of integers in [1, {hi}]")
                continue
            for v in values:
                _int_in(p, f"space.{name} value", v, 1, hi)
        if not p and min(self.top_ks) > min(self.experts):
            p.append(
                f"space.top_ks minimum {min(self.top_ks)} exceeds space.experts minimum "
                f"{min(self.experts)}: the smallest sub-network would route to more experts than it keeps"
            )
        _check(p)

    @classmethod
    def full(cls, config: ModelConfig) -> ElasticSpace:
        """The degenerate space holding only the parent."""
        return cls((config.layers,), (config.experts,), (config.top_k,), (config.expert_width,))

    @classmethod
    def default_for(cls, config: ModelConfig) -> ElasticSpace:
        """A sensible space: depth down to half, experts and width down to a quarter, top-k to 1."""

        def ladder(hi: int, lo: int) -> tuple[int, ...]:
            vals, v = {hi}, hi
            while v // 2 >= max(lo, 1):
                v //= 2
                vals.add(v)
            return tuple(sorted(vals))

        return cls(
            depths=tuple(range(max(1, config.layers // 2), config.layers + 1)),
            experts=ladder(config.experts, max(config.top_k, config.experts // 4)),
            top_ks=tuple(range(1, config.top_k + 1)),
            widths=ladder(config.expert_width, config.expert_width // 4),
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ElasticSpace:
        return _from_dict(cls, data, "space")


MAX_MAPPING_BYTES = 8 << 20  # a recipe, space or model config is a few KB; refuse what is not one


def load_yaml(text: str, where: str) -> Any:
    """YAML through the safe loader with aliases refused: an alias re-uses a node, and nested
    aliases grow exponentially (a 9-line "billion laughs" recipe); without them the parsed data
    is at most proportional to the text. Nesting too deep for the parser is a ConfigError too."""
    import yaml

    try:
        return yaml.load(text, Loader=_no_alias_loader())
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (yaml.YAMLError, RecursionError, ValueError) as exc:  # ValueError: ints beyond Python's digit limit
        raise ConfigError(f"{where}: not valid YAML ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


_LOADER: list = []


def _no_alias_loader():
    if not _LOADER:
        import yaml

        class NoAliasLoader(yaml.SafeLoader):
            def compose_node(self, parent, index):
                if self.check_event(yaml.AliasEvent):
                    mark = self.peek_event().start_mark
                    raise ConfigError(
                        f"YAML aliases (*name) are not accepted (line {mark.line + 1}): an alias can expand "
                        "without bound; write the value out"
                    )
                return super().compose_node(parent, index)

        _LOADER.append(NoAliasLoader)
    return _LOADER[0]


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a JSON, YAML or TOML file into a dict, with a one-line error on failure."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.stat().st_size > MAX_MAPPING_BYTES:
        raise ConfigError(f"config file {path} is {path.stat().st_size:,} bytes; at most {MAX_MAPPING_BYTES:,} allowed")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"cannot parse {path}: not UTF-8 text (a binary file?)") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            data = load_yaml(text, str(path))
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # parse errors from three libraries (and nesting too deep): report uniformly
        raise ConfigError(f"cannot parse {path}: {_first_line(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML scalar/list) to a nested dict copy."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        where = f"override {item!r}" if len(item) <= 200 else f"override {key.strip()}=<{len(raw):,} characters>"
        node[parts[-1]] = load_yaml(raw, where)
    return out


def dump_yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


__all__ = [
    "ConfigError",
    "ElasticSpace",
    "ModelConfig",
    "apply_overrides",
    "dump_yaml",
    "load_mapping",
]
