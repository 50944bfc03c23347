"""Constraint search over a trained elastic parent: which sub-networks to extract.

Pieces, each usable alone:

* `Constraints` / `parse_constraints`: budgets on params, active params, FLOPs/token, latency,
  memory; absolute or as a ratio of the parent (`max_params_ratio=1/3`, `max_active_ratio=1/2`).
* `SubnetEvaluator`: validation loss of a sub-network run through the parent, per task and as a
  weighted mix, cached by Subnet, with the tokens and FLOPs it spent (for the ledger).
* `LatencyTable`: per-part forward times measured on this device (embedding + head, attention,
  MoE at every (experts, top-k, width)); a sub-network's latency is their sum.
* `RidgePredictor`: closed-form ridge regression from Subnet features to loss, used to pick which
  of many bred candidates deserve a real evaluation.
* `exhaustive_search`, `evolutionary_search` (multi-objective, NSGA-II style selection, Deb et
  al. 2002) and `search`, which picks one; `pareto_front` (files and tables of a result: search_output.py).

Units: params are counts, FLOPs are forward FLOPs per token at `seq_len` (`cost.py`), latency is
milliseconds of one forward pass (prefill, no KV cache) of `batch x seq_len` tokens, memory is
`cost.memory_bytes` (weights of all kept experts + KV cache of `batch x seq_len`) and
"mb" means MiB (2**20 bytes).
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from . import cost as costmod
from .config import ConfigError, ElasticSpace, ModelConfig
from .latency import LatencyTable, _error_summary
from .subnet import LayerSpec, Subnet, enumerate_uniform, smallest
from .tokens import unpack_windows
from .train import eval_losses, resolve_device

log = logging.getLogger(__name__)
MIB = 2**20

# -- constraints -------------------------------------------------------------------------------
_ABSOLUTE = {  # constraint field -> Candidate attribute it bounds
    "max_params": "params",
    "max_active_params": "active_params",
    "max_flops_per_token": "flops_per_token",
    "max_latency_ms": "latency_ms",
    "max_memory_mb": "memory_mb",
}
_RATIO = {
    "max_params": "max_params_ratio",
    "max_active_params": "max_active_ratio",
    "max_flops_per_token": "max_flops_ratio",
    "max_latency_ms": "max_latency_ratio",
    "max_memory_mb": "max_memory_ratio",
}  # absolute field -> its ratio form


@dataclass(frozen=True)
class Constraints:
    """Budgets a sub-network must meet; None means unconstrained. A ratio is relative to the parent's
    own figure (e.g. `max_params_ratio=1/3, max_active_ratio=1/2`); with both forms the tighter wins.
    FLOPs, memory and latency are taken at `batch` sequences of `seq_len` tokens (None: the parent's
    max_seq_len)."""

    max_params: float | None = None
    max_active_params: float | None = None
    max_flops_per_token: float | None = None
    max_latency_ms: float | None = None
    max_memory_mb: float | None = None
    max_params_ratio: float | None = None
    max_active_ratio: float | None = None
    max_flops_ratio: float | None = None
    max_latency_ratio: float | None = None
    max_memory_ratio: float | None = None
    batch: int = 1
    seq_len: int | None = None

    def __post_init__(self) -> None:
        problems = [q for f in fields(self) if (q := _bad_value(f.name, getattr(self, f.name)))]
        if problems:
            raise ConfigError("; ".join(problems))

    def given(self) -> dict[str, Any]:
        """The fields that were set, as given."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    @property
    def needs_latency(self) -> bool:
        return self.max_latency_ms is not None or self.max_latency_ratio is not None

    def resolve(self, parent: Candidate) -> dict[str, float]:
        """Absolute limits keyed by Candidate attribute (params, active_params, ...), given the parent's
        figures. Only constrained attributes appear."""
        out: dict[str, float] = {}
        for key, attr in _ABSOLUTE.items():
            ratio_key = _RATIO[key]
            bounds = [getattr(self, key)]
            if getattr(self, ratio_key) is not None:
                base = getattr(parent, attr)
                if base is None:
                    raise ConfigError(f"{ratio_key} needs the parent's {attr}: give a latency table")
                bounds.append(getattr(self, ratio_key) * base)
            bounds = [b for b in bounds if b is not None]
            if bounds:
                out[attr] = min(bounds)
        return out


def _bad_value(key: str, value: Any) -> str | None:
    """Why `value` cannot be constraint `key` (None if it can)."""
    if value is None and key != "batch":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return f"constraint {key}={value!r} must be a positive finite number"
    if key in ("batch", "seq_len") and value != int(value):
        return f"constraint {key}={value!r} must be a positive integer"
    return None


_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}


def _number(raw: Any) -> float:
    """A number from 3, 0.5, "1/3", "12M", "1.5e9", "50%"; ValueError otherwise."""
    if isinstance(raw, bool):
        raise ValueError
    if isinstance(raw, (int, float)):
        return float(raw)
    text = str(raw).strip().replace("_", "")
    if m := re.fullmatch(r"([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)", text):
        return float(m.group(1)) / float(m.group(2))
    if text.endswith("%"):
        return float(text[:-1]) / 100
    if text and text[-1].lower() in _SUFFIX:
        return float(text[:-1]) * _SUFFIX[text[-1].lower()]
    return float(text)


def parse_constraints(spec: Constraints | dict[str, Any] | Sequence[str] | None) -> Constraints:
    """Constraints from a mapping or from `key=value` strings (`max_params_ratio=1/3`,
    `max_active_params=2M`, `max_latency_ms=15`, `batch=8`). Raises ConfigError naming every
    unknown key and bad value at once."""
    if spec is None or isinstance(spec, Constraints):
        return spec or Constraints()
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items, bad = [], []
        for s in spec:
            key, eq, value = str(s).partition("=")
            if eq:
                items.append((key.strip(), value.strip()))
            else:
                bad.append(s)
        if bad:
            raise ConfigError(f"constraints {bad} must look like key=value, e.g. max_params_ratio=1/3")
    allowed = [f.name for f in fields(Constraints)]
    problems, kwargs = [], {}
    for key, raw in items:
        if key not in allowed:
            problems.append(f"unknown constraint {key!r}; allowed: {allowed}")
            continue
        if raw is None:
            continue
        try:
            value = _number(raw)
        except (TypeError, ValueError, ZeroDivisionError):
            problems.append(f"constraint {key}={raw!r} is not a number (e.g. 3, 0.5, 1/3, 12M, 50%)")
            continue
        if bad := _bad_value(key, value):
            problems.append(bad)
        else:
            kwargs[key] = int(value) if key in ("batch", "seq_len") else value
    if problems:
        raise ConfigError("; ".join(problems))
    return Constraints(**kwargs)


def parse_objective(spec: str | dict[str, Any] | None) -> dict[str, float] | None:
    """Task weights of the score a search ranks candidates by, from "find=1,text=0.2" or a mapping:
    the weighted mean of the per-task validation losses on the search split (structured tasks on
    their answers when the run trains so). None or "" keeps the default, every task weighing the same."""
    if spec is None or spec == "":
        return None
    items = spec.items() if isinstance(spec, dict) else (p.partition("=")[::2] for p in str(spec).split(","))
    out, problems = {}, []
    for task, raw in items:
        task = str(task).strip()
        try:
            w = _number(raw)
            if not task or not math.isfinite(w) or w < 0:
                raise ValueError
            out[task] = w
        except (TypeError, ValueError, ZeroDivisionError):
            problems.append(f"{task or '?'}={raw!r}")
    if problems or not out or not sum(out.values()) > 0:
        raise ConfigError(
            f"objective {spec!r}: {', '.join(problems) or 'all weights 0'}; give task=weight pairs, weights >= 0 "
            "and not all 0, e.g. --objective find=1,text=0.2"
        )
    return out


# -- candidates --------------------------------------------------------------------------------
@dataclass
class Candidate:
    """A sub-network with its analytic figures and (once evaluated) its losses."""

    subnet: Subnet
    params: int
    active_params: int
    flops_per_token: int
    memory_bytes: int
    latency_ms: float | None = None  # predicted from the latency table
    latency_ms_measured: float | None = None  # timed directly (reported points only)
    losses: dict[str, float] | None = None  # per task, on the search split
    loss: float | None = None  # weighted mix of `losses`

    @property
    def memory_mb(self) -> float:
        return self.memory_bytes / MIB

    @property
    def text(self) -> str:
        return str(self.subnet)

    def to_dict(self) -> dict[str, Any]:
        return {
            "subnet": self.text,
            "subnet_json": self.subnet.to_dict(),
            "params": self.params,
            "active_params": self.active_params,
            "flops_per_token": self.flops_per_token,
            "memory_bytes": self.memory_bytes,
            "memory_mb": round(self.memory_mb, 4),
            "latency_ms_predicted": self.latency_ms,
            "latency_ms_measured": self.latency_ms_measured,
            "loss_per_task": self.losses,
            "loss_mix": self.loss,
        }


def make_candidate(
    config: ModelConfig, subnet: Subnet, seq_len: int, batch: int, table: LatencyTable | None = None
) -> Candidate:
    c = costmod.cost(config, subnet, seq_len)
    return Candidate(
        subnet,
        c.total_params,
        c.active_params,
        c.flops_forward,
        costmod.memory_bytes(config, subnet, seq_len, batch),
        table.predict(subnet) if table is not None else None,
    )


def _fits(c: Candidate, limits: dict[str, float]) -> bool:
    return all(getattr(c, attr) <= bound * (1 + 1e-9) for attr, bound in limits.items())


# -- quality -----------------------------------------------------------------------------------
class SubnetEvaluator:
    """Loss of sub-networks through the parent on held-out *search* windows (never the test split).

    windows: task -> LongTensor (n, seq_len + 1). Results are cached by Subnet; `.tokens` (predicted
    tokens), `.flops` (per task `cost(config, subnet, seq_len).flops_forward * tokens`, forward
    only) and `.seconds` total the real evaluations and `.evaluations` counts them, for the ledger."""

    def __init__(
        self,
        parent,
        windows: dict[str, torch.Tensor],
        device: torch.device | str,
        task_weights: dict[str, float] | None = None,
        batch: int = 8,
        doc_eos: int | None = None,
    ):
        if not windows:
            raise ConfigError("search needs at least one task of validation windows")
        self.parent = parent
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.windows = {
            t: tuple(x.to(self.device) for x in w) if isinstance(w, tuple) else w.to(self.device)
            for t, w in windows.items()
        }
        self._set_weights(dict(task_weights or dict.fromkeys(windows, 1.0)))
        self.batch, self.doc_eos = batch, doc_eos  # doc_eos: as in train.eval_losses
        self.cache: dict[Subnet, dict[str, float]] = {}
        self.tokens = self.flops = self.evaluations = 0
        self.seconds = 0.0

    @property
    def config(self) -> ModelConfig:
        return self.parent.config

    def weighted(self, weights: dict[str, float] | None) -> SubnetEvaluator:
        """An evaluator scoring by another task mix (an objective, `parse_objective`) that shares this
        one's cache: a sub-network evaluated by either is not evaluated again. It counts its own work."""
        if weights is None:
            return self
        other = SubnetEvaluator.__new__(SubnetEvaluator)
        other.__dict__.update(self.__dict__)
        SubnetEvaluator._set_weights(other, weights)
        other.tokens = other.flops = other.evaluations = 0
        other.seconds = 0.0
        return other

    def _set_weights(self, weights: dict[str, float]) -> None:
        extra = sorted(set(weights) - set(self.windows))
        if extra or any(not v >= 0 for v in weights.values()) or not sum(weights.values()) > 0:
            raise ConfigError(
                f"task_weights {weights} must be non-negative, not all zero, over tasks "
                f"{sorted(self.windows)}" + (f"; unknown {extra}" if extra else "")
            )
        total = sum(weights.get(t, 0.0) for t in self.windows)
        self.weights = {t: weights.get(t, 0.0) / total for t in self.windows}

    def mix(self, losses: dict[str, float]) -> float:
        return sum(self.weights[t] * losses[t] for t in self.weights)

    def __call__(self, subnet: Subnet) -> dict[str, float]:
        """Per-task mean next-token cross-entropy (nats) of `subnet`; cached."""
        if subnet not in self.cache:
            t0 = time.perf_counter()
            self.cache[subnet] = eval_losses(
                self.parent, self.windows, {"s": subnet}, self.device, self.batch, self.doc_eos
            )["s"]
            for w, _ in map(unpack_windows, self.windows.values()):
                self.tokens += w[:, 1:].numel()
                self.flops += costmod.cost(self.config, subnet, w.shape[1] - 1).flops_forward * w[:, 1:].numel()
            self.evaluations += 1
            self.seconds += time.perf_counter() - t0
        return self.cache[subnet]

    def evaluate(self, cand: Candidate) -> Candidate:
        cand.losses = dict(self(cand.subnet))
        cand.loss = self.mix(cand.losses)
        return cand


# -- loss predictor ----------------------------------------------------------------------------
FEATURES = (
    "depth",
    "mean_experts",
    "mean_top_k",
    "mean_width",
    "mean_top_k_x_width",
    "min_width",
    "log_params",
    "log_active_params",
    "log_flops",
)


def subnet_features(config: ModelConfig, subnet: Subnet, seq_len: int | None = None) -> np.ndarray:
    """Feature vector (names in FEATURES) of a sub-network, for the ridge predictor."""
    c = costmod.cost(config, subnet, seq_len)
    s = subnet.specs
    return np.array(
        [
            subnet.depth,
            np.mean([x.experts for x in s]),
            np.mean([x.top_k for x in s]),
            np.mean([x.width for x in s]),
            np.mean([x.top_k * x.width for x in s]),
            min(x.width for x in s),
            math.log(c.total_params),
            math.log(c.active_params),
            math.log(c.flops_forward),
        ],
        dtype=np.float64,
    )


class RidgePredictor:
    """Ridge regression in closed form, w = (X'X + alpha I)^-1 X'y, on standardised features with an
    unpenalised intercept (Hoerl & Kennard 1970)."""

    def __init__(self, alpha: float = 1e-3):
        self.alpha = alpha
        self.coef: np.ndarray | None = None

    def fit(self, X: np.ndarray, y: np.ndarray) -> RidgePredictor:
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
        self.mean, self.scale = X.mean(0), X.std(0)
        self.scale[self.scale == 0] = 1.0
        Z = (X - self.mean) / self.scale
        self.intercept = y.mean()
        self.coef = np.linalg.solve(Z.T @ Z + self.alpha * np.eye(Z.shape[1]), Z.T @ (y - self.intercept))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.coef is None:
            raise RuntimeError("RidgePredictor.predict before fit")
        return ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale) @ self.coef + self.intercept


# -- Pareto ------------------------------------------------------------------------------------
def _objective(o: str | Callable[[Any], float]) -> Callable[[Any], float]:
    return o if callable(o) else (lambda p: getattr(p, o))


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a dominates b (all objectives minimised): no worse in every one, better in at least one."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Any], objectives: Sequence[str | Callable[[Any], float]]) -> list[Any]:
    """The points no other point dominates (every objective minimised; an objective is an attribute
    name or a function), sorted by the first objective then the second."""
    fns = [_objective(o) for o in objectives]
    vals = [tuple(f(p) for f in fns) for p in points]
    front = [i for i, v in enumerate(vals) if not any(dominates(w, v) for w in vals)]
    return [points[i] for i in sorted(front, key=lambda i: vals[i])]


def _nsga_order(cands: list[Candidate], objectives: Sequence[str]) -> list[Candidate]:
    """Best first: by non-dominated front, then by crowding distance (Deb et al. 2002), then text."""
    out, rest = [], list(cands)
    while rest:
        front = pareto_front(rest, objectives)
        crowd = {id(c): 0.0 for c in front}
        for o in objectives:
            ordered = sorted(front, key=lambda c: (getattr(c, o), c.text))
            lo, hi = getattr(ordered[0], o), getattr(ordered[-1], o)
            crowd[id(ordered[0])] = crowd[id(ordered[-1])] = math.inf
            for a, b, c in zip(ordered, ordered[1:], ordered[2:]):
                crowd[id(b)] += (getattr(c, o) - getattr(a, o)) / (hi - lo or 1.0)
        out += sorted(front, key=lambda c: (-crowd[id(c)], c.text))
        taken = {id(c) for c in front}
        rest = [c for c in rest if id(c) not in taken]
    return out


# -- search ------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    method: str  # "exhaustive" or "evolutionary"
    seed: int
    constraints: Constraints
    limits: dict[str, float]  # resolved absolute limits, keyed by Candidate attribute
    parent: Candidate
    evaluated: list[Candidate]  # every feasible candidate evaluated for real
    frontier: list[Candidate]  # Pareto front of loss vs active params
    latency_frontier: list[Candidate]  # Pareto front of loss vs predicted latency (empty without a table)
    per_layer: bool = False
    space: ElasticSpace | None = None
    latency_table: LatencyTable | None = None
    predictor: dict[str, Any] | None = None  # loss predictor error on out-of-sample real evaluations
    latency_error: dict[str, Any] | None = None  # latency table error on the reported points
    seq_len: int = 0  # FLOPs, memory and latency are taken at batch x seq_len
    batch: int = 1
    # Work this search did, for the ledger: loss evaluations (the parent's included) plus the direct
    # latency timings of the reported points. Building the latency table is the caller's to record
    # (`LatencyTable.meta["seconds"]`).
    tokens: int = 0
    flops: int = 0
    seconds: float = 0.0
    objective: dict[str, float] | None = None  # the task weights of `Candidate.loss` (normalised)

    @property
    def reported(self) -> list[Candidate]:
        seen, out = set(), []
        for c in self.frontier + self.latency_frontier:
            if c.subnet not in seen:
                seen.add(c.subnet)
                out.append(c)
        return out


class _Problem:
    """What every search shares: the parent, the figures of a subnet, feasibility, impossibility."""

    def __init__(
        self,
        evaluator: SubnetEvaluator,
        space: ElasticSpace,
        layer_order: Sequence[int],
        constraints,
        table: LatencyTable | None,
    ):
        self.evaluator, self.space, self.table = evaluator, space, table
        self.layer_order = list(layer_order)
        self.config: ModelConfig = evaluator.config
        space.validate(self.config)
        self.constraints = parse_constraints(constraints)
        self.seq_len = self.constraints.seq_len or self.config.max_seq_len
        self.batch = self.constraints.batch
        if self.seq_len > self.config.max_seq_len:
            raise ConfigError(
                f"constraint seq_len={self.seq_len} exceeds the parent's max_seq_len={self.config.max_seq_len}"
            )
        self.start = (evaluator.tokens, evaluator.flops, evaluator.seconds)  # this search's share = the delta
        if self.constraints.needs_latency:
            if table is None:
                raise ConfigError("a latency constraint needs a latency table (LatencyTable.measure)")
            if (table.batch, table.seq_len) != (self.batch, self.seq_len):
                raise ConfigError(
                    f"latency table measured at batch {table.batch} x seq_len {table.seq_len} but the "
                    f"constraints ask for batch {self.batch} x seq_len {self.seq_len}; re-measure"
                )
        self.parent = evaluator.evaluate(self.candidate(Subnet.full(self.config)))
        self.limits = self.constraints.resolve(self.parent)
        self.objectives = ("loss", "active_params") + (("latency_ms",) if table is not None else ())

    def candidate(self, subnet: Subnet) -> Candidate:
        return make_candidate(self.config, subnet, self.seq_len, self.batch, self.table)

    def fits(self, cand: Candidate) -> bool:
        return _fits(cand, self.limits)

    def impossible(self) -> ConfigError:
        """The error for an empty feasible set, naming the smallest achievable figures."""
        low = self.candidate(smallest(self.space, self.layer_order))
        parts = [
            f"params {low.params:,}",
            f"active params {low.active_params:,}",
            f"FLOPs/token {low.flops_per_token:,}",
            f"memory {low.memory_mb:.3f} MiB",
        ]
        if self.table is not None:
            t, sp = self.table, self.space
            layer = min(
                (
                    t.layer_ms(LayerSpec(*key))
                    for key in t.moe_ms
                    if key[0] in sp.experts and key[1] in sp.top_ks and key[2] in sp.widths
                ),
                default=0.0,
            )
            parts.append(f"latency {t.base_ms + min(sp.depths) * layer:.3f} ms")
        limits = ", ".join(f"{k} <= {v:,.6g}" for k, v in self.limits.items())
        return ConfigError(
            f"no sub-network in the space meets the constraints ({limits}; given "
            f"{self.constraints.given()}); smallest achievable in this space ({low.text}, "
            f"seq_len {self.seq_len}, batch {self.batch}): " + ", ".join(parts)
        )

    def finish(
        self,
        method: str,
        seed: int,
        evaluated: list[Candidate],
        per_layer: bool,
        measure_latency: bool,
        predictor: dict | None = None,
    ) -> SearchResult:
        evaluated = sorted(evaluated, key=lambda c: (c.active_params, c.loss, c.text))
        front = pareto_front(evaluated, ("active_params", "loss"))
        lat_front = pareto_front(evaluated, ("latency_ms", "loss")) if self.table is not None else []
        result = SearchResult(
            method,
            seed,
            self.constraints,
            self.limits,
            self.parent,
            evaluated,
            front,
            lat_front,
            per_layer,
            self.space,
            self.table,
            predictor,
            seq_len=self.seq_len,
            batch=self.batch,
        )
        ev = self.evaluator
        result.objective = dict(ev.weights)
        result.tokens, result.flops, result.seconds = (
            x - y for x, y in zip((ev.tokens, ev.flops, ev.seconds), self.start)
        )
        if self.table is not None and measure_latency:
            timed, t0 = result.reported + [self.parent], time.perf_counter()
            ms = self.table.measure_direct(ev.parent, [c.subnet for c in timed], ev.device)
            runs = (1 + self.table.repeats) * self.table.batch * self.table.seq_len  # warm-up + timed rounds
            result.tokens += runs * len(timed)
            result.flops += sum(
                runs * costmod.cost(self.config, c.subnet, self.table.seq_len).flops_forward for c in timed
            )
            result.seconds += time.perf_counter() - t0
            for c, m in zip(timed, ms):
                c.latency_ms_measured = m
            result.latency_error = _error_summary(
                [abs(c.latency_ms - c.latency_ms_measured) / c.latency_ms_measured for c in result.reported]
            )
            over = [
                c.text
                for c in result.reported
                if "latency_ms" in self.limits and c.latency_ms_measured > self.limits["latency_ms"]
            ]
            if over:
                log.warning("measured latency exceeds the limit for %s (predicted within it)", over)
        return result


def exhaustive_search(
    evaluator: SubnetEvaluator,
    space: ElasticSpace,
    layer_order: Sequence[int],
    constraints=None,
    seed: int = 0,
    latency_table: LatencyTable | None = None,
    measure_latency: bool = True,
) -> SearchResult:
    """Evaluate every feasible uniform sub-network of `space` (small spaces only)."""
    pb = _Problem(evaluator, space, layer_order, constraints, latency_table)
    feasible = [c for c in map(pb.candidate, enumerate_uniform(space, pb.layer_order)) if pb.fits(c)]
    if not feasible:
        raise pb.impossible()
    evaluated = [evaluator.evaluate(c) for c in feasible]
    log.info("exhaustive search: %d feasible sub-networks evaluated", len(evaluated))
    return pb.finish("exhaustive", seed, evaluated, False, measure_latency)


# A genome: (depth, one LayerSpec per rank in layer_order). Kept layers are the first `depth` in
# keep order; the specs of dropped ranks ride along so depth can grow again. Uniform: specs all equal.
Genome = tuple[int, tuple[LayerSpec, ...]]


def _spec(
    space: ElasticSpace, rng: random.Random, e: int | None = None, k: int | None = None, w: int | None = None
) -> LayerSpec:
    e = rng.choice(space.experts) if e is None else e
    if k is None or k > e:
        k = rng.choice([x for x in space.top_ks if x <= e])
    return LayerSpec(e, k, rng.choice(space.widths) if w is None else w)


def _random_genome(space: ElasticSpace, n: int, rng: random.Random, per_layer: bool) -> Genome:
    d = rng.choice(space.depths)
    specs = tuple(_spec(space, rng) for _ in range(n)) if per_layer else (_spec(space, rng),) * n
    return d, specs


def _breed(
    a: Genome, b: Genome, space: ElasticSpace, rng: random.Random, p_mut: float, p_cross: float, per_layer: bool
) -> Genome:
    """Uniform crossover of the genes of a and b (with probability p_cross), then each gene redrawn
    from the space with probability p_mut; top-k redrawn whenever it exceeds the experts kept."""
    cross = rng.random() < p_cross
    d = rng.choice((a[0], b[0])) if cross else a[0]
    d = rng.choice(space.depths) if rng.random() < p_mut else d
    out = []
    for x, y in zip(a[1], b[1]) if per_layer else [(a[1][0], b[1][0])]:
        genes = [rng.choice(pair) if cross else pair[0] for pair in zip(asdict(x).values(), asdict(y).values())]
        e, k, w = [None if rng.random() < p_mut else g for g in genes]
        out.append(_spec(space, rng, e, k, w))
    return d, (tuple(out) if per_layer else tuple(out) * len(a[1]))


class _Evolution:
    """State of one evolutionary run: the population of (genome, candidate), everything seen."""

    def __init__(self, pb: _Problem, rng: random.Random, per_layer: bool):
        self.pb, self.rng, self.per_layer = pb, rng, per_layer
        self.rank = {layer: r for r, layer in enumerate(pb.layer_order)}
        self.seen: set[Subnet] = set()
        self.pop: list[tuple[Genome, Candidate]] = []
        self.ranked: dict[int, int] = {}

    def subnet(self, g: Genome) -> Subnet:
        kept = sorted(self.pb.layer_order[: g[0]])
        return Subnet(tuple(kept), tuple(g[1][self.rank[i]] for i in kept))

    def draw(self, make: Callable[[], Genome], count: int) -> list[tuple[Genome, Candidate]]:
        """Up to `count` new, constraint-satisfying (genome, candidate) pairs from `make`."""
        out: list[tuple[Genome, Candidate]] = []
        for _ in range(count * 30):
            if len(out) == count:
                break
            g = make()
            sn = self.subnet(g)
            if sn in self.seen:
                continue
            cand = self.pb.candidate(sn)
            if self.pb.fits(cand):
                self.seen.add(sn)
                out.append((g, cand))
        return out

    def initial(self, population: int) -> list[tuple[Genome, Candidate]]:
        space, n = self.pb.space, self.pb.config.layers
        pop = self.draw(lambda: _random_genome(space, n, self.rng, self.per_layer), population)
        if len(pop) < population:  # tight constraints: top up from the feasible uniform sub-networks
            cands = [self.pb.candidate(sn) for sn in enumerate_uniform(space, self.pb.layer_order)]
            feasible = [c for c in cands if c.subnet not in self.seen and self.pb.fits(c)]
            for c in self.rng.sample(feasible, min(len(feasible), population - len(pop))):
                pop.append(((c.subnet.depth, (c.subnet.specs[0],) * n), c))
                self.seen.add(c.subnet)
        return pop

    def select(self, pool: list[tuple[Genome, Candidate]], size: int) -> None:
        order = _nsga_order([c for _, c in pool], self.pb.objectives)
        self.ranked = {id(c): r for r, c in enumerate(order)}
        self.pop = sorted(pool, key=lambda gc: self.ranked[id(gc[1])])[:size]

    def tournament(self) -> Genome:
        a, b = self.rng.choice(self.pop), self.rng.choice(self.pop)
        return (a if self.ranked[id(a[1])] <= self.ranked[id(b[1])] else b)[0]

    def offspring(self, count: int, p_mut: float, p_cross: float) -> list[tuple[Genome, Candidate]]:
        def make() -> Genome:
            return _breed(self.tournament(), self.tournament(), self.pb.space, self.rng, p_mut, p_cross, self.per_layer)

        return self.draw(make, count)


def _prefilter(
    pb: _Problem, real: list[Candidate], kids: list[tuple[Genome, Candidate]], keep: int
) -> tuple[list[tuple[Genome, Candidate]], dict[Subnet, float]]:
    """The `keep` offspring that look best to a ridge model fitted on the real evaluations so far,
    and its loss guesses for them."""
    feats = lambda cs: np.stack([subnet_features(pb.config, c.subnet, pb.seq_len) for c in cs])  # noqa: E731
    model = RidgePredictor().fit(feats(real), np.array([c.loss for c in real]))
    guesses = model.predict(feats([c for _, c in kids]))
    proxies = [replace(c, loss=float(p)) for (_, c), p in zip(kids, guesses)]
    chosen = {p.subnet: p.loss for p in _nsga_order(proxies, pb.objectives)[:keep]}
    return [(g, c) for g, c in kids if c.subnet in chosen], chosen


def evolutionary_search(
    evaluator: SubnetEvaluator,
    space: ElasticSpace,
    layer_order: Sequence[int],
    constraints=None,
    seed: int = 0,
    population: int = 16,
    generations: int = 6,
    mutation_prob: float = 0.3,
    crossover_prob: float = 0.5,
    per_layer: bool = False,
    latency_table: LatencyTable | None = None,
    use_predictor: bool = False,
    predictor_pool: int = 4,
    measure_latency: bool = True,
) -> SearchResult:
    """Multi-objective evolution (minimise loss, active params and, with a table, predicted latency),
    seeded by `random.Random(seed)` only. Only constraint-satisfying candidates are ever kept.

    Each generation breeds offspring from binary tournaments (crossover + mutation), evaluates them
    and keeps the best `population` by non-dominated rank and crowding distance. With
    `use_predictor`, `predictor_pool` times as many offspring are bred, a ridge model fitted on all
    real evaluations so far ranks them, and only the best half-population is evaluated for real:
    every reported loss is a real measurement; the predictor's out-of-sample error is reported."""
    bad = [
        f"{k}={v!r}"
        for k, v, ok in [
            ("population", population, isinstance(population, int) and population >= 2),
            ("generations", generations, isinstance(generations, int) and generations >= 0),
            ("mutation_prob", mutation_prob, 0 <= mutation_prob <= 1),
            ("crossover_prob", crossover_prob, 0 <= crossover_prob <= 1),
            ("predictor_pool", predictor_pool, isinstance(predictor_pool, int) and predictor_pool >= 1),
        ]
        if not ok
    ]
    if bad:
        raise ConfigError(
            f"evolutionary search: {', '.join(bad)} out of range (population >= 2, generations >= 0, "
            "probabilities in [0, 1], predictor_pool >= 1)"
        )
    pb = _Problem(evaluator, space, layer_order, constraints, latency_table)
    evo = _Evolution(pb, random.Random(seed), per_layer)
    first = evo.initial(population)
    if not first:
        raise pb.impossible()
    real = [evaluator.evaluate(c) for _, c in first]
    evo.select(first, population)
    pred_err: list[float] = []
    for gen in range(generations):
        kids = evo.offspring(population * (predictor_pool if use_predictor else 1), mutation_prob, crossover_prob)
        guesses: dict[Subnet, float] = {}
        if use_predictor and len(real) >= 4 and kids:
            kids, guesses = _prefilter(pb, real, kids, max(2, population // 2))
        for _, c in kids:
            evaluator.evaluate(c)
            if c.subnet in guesses:
                pred_err.append(abs(guesses[c.subnet] - c.loss))
        real += [c for _, c in kids]
        evo.select(evo.pop + kids, population)
        log.info(
            "generation %d/%d | %d new | %d evaluated | best loss %.4f",
            gen + 1,
            generations,
            len(kids),
            len(real),
            min(c.loss for c in real),
        )
    predictor = None
    if use_predictor:
        predictor = {
            "model": "ridge",
            "features": list(FEATURES),
            "n_out_of_sample": len(pred_err),
            "mean_abs_error": float(np.mean(pred_err)) if pred_err else None,
            "max_abs_error": max(pred_err) if pred_err else None,
        }
    return pb.finish("evolutionary", seed, real, per_layer, measure_latency, predictor)


def search(
    evaluator: SubnetEvaluator,
    space: ElasticSpace,
    layer_order: Sequence[int],
    constraints=None,
    seed: int = 0,
    per_layer: bool = False,
    latency_table: LatencyTable | None = None,
    exhaustive_limit: int = 200,
    measure_latency: bool = True,
    **evolution: Any,
) -> SearchResult:
    """Exhaustive when the uniform space holds at most `exhaustive_limit` sub-networks (and the search
    is not per-layer), evolutionary otherwise; `evolution` goes to `evolutionary_search`."""
    if not per_layer and len(enumerate_uniform(space, list(layer_order))) <= exhaustive_limit:
        return exhaustive_search(evaluator, space, layer_order, constraints, seed, latency_table, measure_latency)
    return evolutionary_search(
        evaluator,
        space,
        layer_order,
        constraints,
        seed,
        per_layer=per_layer,
        latency_table=latency_table,
        measure_latency=measure_latency,
        **evolution,
    )


__all__ = [
    "Candidate",
    "Constraints",
    "FEATURES",
    "LatencyTable",
    "RidgePredictor",
    "SearchResult",
    "SubnetEvaluator",
    "dominates",
    "evolutionary_search",
    "exhaustive_search",
    "make_candidate",
    "pareto_front",
    "parse_constraints",
    "parse_objective",
    "search",
    "subnet_features",
]
