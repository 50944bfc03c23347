"""Subnet: one point of the elastic space, and how to sample, print and parse it.

Text grammar (uniform sub-networks), four space-separated fields in any order:

    L[0-3,5]   kept parent layer indices (ranges and single indices, increasing)
    L6         shorthand: keep 6 layers, chosen by the parent's layer order
               (`layer_order`, most important first; identity if not given)
    E8         experts kept per layer (a prefix of the importance-ordered experts)
    k2         routing top-k
    W256       expert hidden width kept (a prefix of the importance-ordered neurons)

`str(subnet)` always prints the explicit `L[...]` form, so printing then parsing is the
identity. A per-layer sub-network prints as JSON:
`{"layers": [{"index": 0, "experts": 8, "top_k": 2, "width": 256}, ...]}`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, ElasticSpace, ModelConfig


@dataclass(frozen=True)
class LayerSpec:
    """What one kept layer keeps."""

    experts: int
    top_k: int
    width: int


@dataclass(frozen=True)
class Subnet:
    """Kept parent layer indices and, for each kept layer, its LayerSpec."""

    layers: tuple[int, ...]
    specs: tuple[LayerSpec, ...]

    # construction -------------------------------------------------------------------------
    @classmethod
    def uniform(cls, layers: tuple[int, ...] | list[int], experts: int, top_k: int, width: int) -> Subnet:
        layers = tuple(layers)
        return cls(layers, tuple(LayerSpec(experts, top_k, width) for _ in layers))

    @classmethod
    def full(cls, config: ModelConfig) -> Subnet:
        layers = tuple(range(config.layers))
        return cls(layers, tuple(LayerSpec(*config.layer_shape(i)) for i in layers))

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def is_uniform(self) -> bool:
        return len(set(self.specs)) <= 1

    def spec_for(self, layer: int) -> LayerSpec:
        return self.specs[self.layers.index(layer)]

    # validation ---------------------------------------------------------------------------
    def validate(self, config: ModelConfig) -> Subnet:
        """Raise ConfigError naming every field outside what `config` allows; return self."""
        p: list[str] = []
        if len(self.layers) == 0:
            p.append(f"layers: depth 0 is not allowed; keep between 1 and {config.layers} layers")
        if len(self.layers) != len(self.specs):
            p.append(f"layers: {len(self.layers)} indices but {len(self.specs)} layer specs")
        for i in self.layers:
            if not isinstance(i, int) or not 0 <= i < config.layers:
                p.append(f"layer index {i} is out of range; allowed [0, {config.layers - 1}]")
        if list(self.layers) != sorted(set(self.layers)):
            p.append(f"layers {list(self.layers)} must be strictly increasing without repeats")
        for i, s in zip(self.layers, self.specs):
            if not isinstance(i, int) or not 0 <= i < config.layers:
                continue
            where = f"layer {i}"
            max_e, _, max_w = config.layer_shape(i)
            if not 1 <= s.experts <= max_e:
                p.append(f"{where}: experts={s.experts} out of range; allowed [1, {max_e}]")
            if not 1 <= s.top_k <= min(s.experts, max_e):
                p.append(
                    f"{where}: top_k={s.top_k} out of range; allowed [1, {max(1, min(s.experts, max_e))}]"
                    " (top-k cannot exceed the experts kept)"
                )
            if not 1 <= s.width <= max_w:
                p.append(f"{where}: width={s.width} out of range; allowed [1, {max_w}]")
        if p:
            raise ConfigError("invalid subnet: " + "; ".join(dict.fromkeys(p)))
        return self

    def in_space(self, space: ElasticSpace) -> bool:
        return self.depth in space.depths and all(
            s.experts in space.experts and s.top_k in space.top_ks and s.width in space.widths for s in self.specs
        )

    # text and JSON ------------------------------------------------------------------------
    def __str__(self) -> str:
        if not self.is_uniform:
            return self.to_json()
        s = self.specs[0]
        return f"L[{_ranges(self.layers)}] E{s.experts} k{s.top_k} W{s.width}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [
                {"index": i, "experts": s.experts, "top_k": s.top_k, "width": s.width}
                for i, s in zip(self.layers, self.specs)
            ]
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Subnet:
        if not isinstance(data, dict) or set(data) != {"layers"} or not isinstance(data["layers"], list):
            got = f"got fields {sorted(data)}" if isinstance(data, dict) else f"got {type(data).__name__}"
            shape = '{"layers": [{"index", "experts", "top_k", "width"}, ...]}'
            raise ConfigError(f"subnet JSON must be {shape}; {got}")
        layers, specs = [], []
        want = {"index", "experts", "top_k", "width"}
        for n, entry in enumerate(data["layers"]):
            if not isinstance(entry, dict) or set(entry) != want:
                got = sorted(entry) if isinstance(entry, dict) else entry
                raise ConfigError(f"subnet JSON layers[{n}] has fields {got}; expected exactly {sorted(want)}")
            for key in want:
                if not isinstance(entry[key], int) or isinstance(entry[key], bool):
                    raise ConfigError(f"subnet JSON layers[{n}].{key}={entry[key]!r} must be an integer")
            layers.append(entry["index"])
            specs.append(LayerSpec(entry["experts"], entry["top_k"], entry["width"]))
        return cls(tuple(layers), tuple(specs))

    @classmethod
    def parse(cls, text: str, config: ModelConfig, layer_order: list[int] | None = None) -> Subnet:
        """Parse the text grammar (or JSON) and validate against `config`."""
        text = text.strip()
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"subnet JSON does not parse: {exc}") from None
            return cls.from_dict(data).validate(config)
        fields_: dict[str, str] = {}
        for tok in text.split():
            m = re.fullmatch(r"([LEkW])(.+)", tok)
            if not m:
                raise ConfigError(
                    f"subnet spec {text!r}: cannot read {tok!r}; expected fields like "
                    "'L6' or 'L[0-3,5]', 'E8', 'k2', 'W256'"
                )
            if m.group(1) in fields_:
                raise ConfigError(f"subnet spec {text!r}: field {m.group(1)} given twice")
            fields_[m.group(1)] = m.group(2)
        missing = [f for f in "LEkW" if f not in fields_]
        if missing:
            raise ConfigError(f"subnet spec {text!r}: missing field(s) {missing}; e.g. 'L6 E8 k2 W256'")
        nums = {}
        for f in "EkW":
            if not _is_int(fields_[f]):
                raise ConfigError(f"subnet spec {text!r}: {f}{fields_[f]} must be {f} followed by an integer")
            nums[f] = int(fields_[f])
        layers = _parse_layers(fields_["L"], config, layer_order, text)
        return cls.uniform(layers, nums["E"], nums["k"], nums["W"]).validate(config)


def _ranges(idx: tuple[int, ...]) -> str:
    parts, start = [], None
    for n, i in enumerate(idx):
        if start is None:
            start = i
        if n + 1 == len(idx) or idx[n + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


def _is_int(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts characters such as '²' that int() rejects."""
    return re.fullmatch(r"[0-9]+", text) is not None


def _parse_layers(raw: str, config: ModelConfig, layer_order: list[int] | None, text: str) -> tuple[int, ...]:
    if _is_int(raw):
        depth = int(raw)
        if not 1 <= depth <= config.layers:
            raise ConfigError(f"subnet spec {text!r}: depth L{depth} out of range; allowed [1, {config.layers}]")
        order = list(layer_order) if layer_order is not None else list(range(config.layers))
        return tuple(sorted(order[:depth]))
    m = re.fullmatch(r"\[([0-9,\-\s]*)\]", raw)
    if not m:
        raise ConfigError(f"subnet spec {text!r}: layers must be 'L<depth>' or 'L[<indices>]' like L[0-3,5]")
    out: list[int] = []
    for part in filter(None, (s.strip() for s in m.group(1).split(","))):
        if "-" in part:
            a, _, b = part.partition("-")
            if not (_is_int(a) and _is_int(b)) or int(a) > int(b):
                raise ConfigError(f"subnet spec {text!r}: bad layer range {part!r}")
            out.extend(range(int(a), int(b) + 1))
        elif _is_int(part):
            out.append(int(part))
        else:
            raise ConfigError(f"subnet spec {text!r}: bad layer index {part!r}")
    return tuple(out)


# sampling -----------------------------------------------------------------------------------
def largest(space: ElasticSpace, layer_order: list[int]) -> Subnet:
    d, e = max(space.depths), max(space.experts)
    k = max(k for k in space.top_ks if k <= e)  # a space may offer a top-k above its largest expert count
    return Subnet.uniform(sorted(layer_order[:d]), e, k, max(space.widths))


def smallest(space: ElasticSpace, layer_order: list[int]) -> Subnet:
    d, e = min(space.depths), min(space.experts)
    k = min(min(space.top_ks), e)  # a phase of progressive shrinking may offer only larger k
    return Subnet.uniform(sorted(layer_order[:d]), e, k, min(space.widths))


def sample_uniform(space: ElasticSpace, layer_order: list[int], rng: random.Random) -> Subnet:
    """One uniform sub-network drawn from the space; top-k never exceeds the experts kept."""
    d = rng.choice(space.depths)
    e = rng.choice(space.experts)
    k = rng.choice([k for k in space.top_ks if k <= e] or [e])  # a phase space may offer only larger k
    w = rng.choice(space.widths)
    return Subnet.uniform(sorted(layer_order[:d]), e, k, w)


def sample_per_layer(space: ElasticSpace, layer_order: list[int], rng: random.Random) -> Subnet:
    """A per-layer (heterogeneous) sub-network: depth uniform, each layer's E/k/W drawn independently."""
    d = rng.choice(space.depths)
    layers = sorted(layer_order[:d])
    return Subnet(tuple(layers), tuple(_layer_spec(space, rng) for _ in layers))


def _layer_spec(space: ElasticSpace, rng: random.Random) -> LayerSpec:
    e = rng.choice(space.experts)
    return LayerSpec(e, rng.choice([k for k in space.top_ks if k <= e] or [e]), rng.choice(space.widths))


def sample_layer_drop(
    space: ElasticSpace, layer_order: list[int], rng: random.Random, drop_max: float, per_layer: bool
) -> Subnet:
    """Depth by layer dropping (LayerDrop, Fan et al. 2019; LayerSkip, Elhoushi et al. 2024): the
    layer at position i of the layer order (most important first) is dropped with probability
    drop_max * i / (L - 1), so the most important layer is always kept and the least important
    most often dropped; the kept count is then brought into the space's depths (the most
    important dropped layers come back, or the least important kept go). The kept set need not be a
    prefix of the layer order. Experts, top-k and width as `sample_uniform` (or per layer)."""
    n = len(layer_order)
    kept = [lay for i, lay in enumerate(layer_order) if rng.random() >= drop_max * i / max(n - 1, 1)]
    fits = [d for d in space.depths if d <= len(kept)]
    d = max(fits) if fits else min(space.depths)
    if d > len(kept):
        kept += [lay for lay in layer_order if lay not in kept][: d - len(kept)]
    kept = [lay for lay in layer_order if lay in kept][:d]
    if per_layer:
        return Subnet(tuple(sorted(kept)), tuple(_layer_spec(space, rng) for _ in kept))
    return Subnet.uniform(sorted(kept), *dataclasses.astuple(_layer_spec(space, rng)))


def enumerate_uniform(space: ElasticSpace, layer_order: list[int]) -> list[Subnet]:
    """Every uniform sub-network of the space (small spaces only)."""
    return [
        Subnet.uniform(sorted(layer_order[:d]), e, k, w)
        for d in space.depths
        for e in space.experts
        for k in space.top_ks
        if k <= e
        for w in space.widths
    ]
