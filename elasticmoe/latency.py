"""Latency, measured not guessed: a lookup table of per-part forward times on this device.

A sub-network's latency is predicted as the sum of its parts (embedding + LM head, attention per
kept layer, MoE per kept layer at its (experts, top-k, width)), each timed here on the current
device; `LatencyTable.validate` reports the prediction's error against direct timings of held-out
sub-networks. Latency means one prefill forward of `batch x seq_len` tokens (no KV cache), in
milliseconds; timings are interleaved round-robin and reduced by the median (or min).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import atomic_write_text
from .config import ConfigError, ElasticSpace, ModelConfig
from .subnet import LayerSpec, Subnet
from .train import autocast, resolve_device

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(
    fns: dict[Any, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 1, statistic: str = "median"
) -> dict[Any, float]:
    """Milliseconds per call of each function: `warmup` untimed calls each, then `repeats` rounds
    that call every function once in turn (interleaved, so a burst of load from other processes
    hits all of them alike), reduced by the median (or min) over rounds."""
    reduce = {"median": statistics.median, "min": min}[statistic]
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[Any, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: reduce(v) * 1e3 for k, v in times.items()}


@dataclass
class LatencyTable:
    """Forward-pass time of a sub-network as a sum of measured parts:
    `base_ms` (embedding, RoPE tables, final norm, LM head) + per kept layer `attention_ms`
    (norm, attention, residual) + `moe_ms[(experts, top_k, width)]` (norm, router, experts,
    residual); a dense layer (`dense_layers`, ERNIE-4.5 / GLM-4.5) costs `attention_ms + dense_ms`
    whatever its spec. Measured on one device at `batch x seq_len` tokens: `statistic` (median or min) of
    `repeats` interleaved rounds. (Fitting an overhead term, a + b * depth (+ c * experts), to a few
    direct measurements made held-out errors no better on 2 shared CPU cores: noise dominates.)"""

    seq_len: int
    batch: int
    device: str
    repeats: int
    base_ms: float
    attention_ms: float
    moe_ms: dict[tuple[int, int, int], float]
    statistic: str = "median"
    meta: dict[str, Any] = field(default_factory=dict)
    dense_layers: tuple[int, ...] = ()  # the parent's dense layers and the time of one
    dense_ms: float = 0.0
    parent: Any = field(default=None, repr=False, compare=False)  # kept for validate(); never saved

    @classmethod
    @torch.no_grad()
    def measure(
        cls,
        parent,
        seq_len: int,
        batch: int,
        device: torch.device | str,
        repeats: int = 5,
        space: ElasticSpace | None = None,
        warmup: int = 1,
        statistic: str = "median",
    ) -> LatencyTable:
        """Time each part on `device` with the parent's own weights (the first layer in keep order)
        for every (experts, top_k, width) of `space` (default: `ElasticSpace.default_for`) and the parent's."""
        if statistic not in ("median", "min") or repeats < 1:
            raise ConfigError(f"latency statistic={statistic!r} repeats={repeats}: allowed median or min, repeats >= 1")
        device = resolve_device(device) if isinstance(device, str) else device
        c: ModelConfig = parent.config
        space = space or ElasticSpace.default_for(c)
        shapes = {(e, k, w) for e in space.experts for k in space.top_ks if k <= e for w in space.widths}
        shapes.add((c.experts, c.top_k, c.expert_width))  # the parent, for ratio constraints
        t0, was = time.perf_counter(), parent.training
        parent.eval()
        tokens = _tokens(c, batch, seq_len, device)
        moe_layers = [i for i in parent.layer_order if not c.is_dense(i)] or parent.layer_order
        block = parent.blocks[moe_layers[0]]
        with autocast(device):
            x = parent.embed(tokens)
            cos, sin = _rope(parent, seq_len, device, x.dtype)
            fns: dict[Any, Callable[[], Any]] = {
                "base": lambda: _base_forward(parent, tokens),
                "attention": lambda: block.attention_half(x, cos, sin),
            }
            fns.update({s: (lambda s=s: block.moe_half(x, LayerSpec(*s))[0]) for s in sorted(shapes)})
            if c.dense_layers:  # kept whole: one time whatever the spec
                dense = parent.blocks[c.dense_layers[0]]
                fns["dense"] = lambda: dense.moe_half(x, LayerSpec(c.experts, c.top_k, c.expert_width))[0]
            ms = _time_ms(fns, device, repeats, warmup, statistic)
        parent.train(was)
        moe = {s: ms[s] for s in sorted(shapes)}
        table = cls(
            seq_len, batch, str(device), repeats, ms["base"], ms["attention"], moe, statistic=statistic, parent=parent
        )
        table.dense_layers, table.dense_ms = tuple(c.dense_layers), ms.get("dense", 0.0)
        table.meta = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "dtype": str(x.dtype),
            "model": c.to_dict(),
            "seconds": round(time.perf_counter() - t0, 3),
            "measured_at": time.time(),
        }
        return table

    def predict(self, subnet: Subnet) -> float:
        """Predicted forward milliseconds of `subnet`."""
        return self.base_ms + sum(self.layer_ms(s, i) for i, s in zip(subnet.layers, subnet.specs))

    def layer_ms(self, s: LayerSpec, layer: int | None = None) -> float:
        """Predicted milliseconds of one kept layer (parent index `layer`) with shape `s`."""
        if layer in self.dense_layers:
            return self.attention_ms + self.dense_ms
        key = (s.experts, s.top_k, s.width)
        if key not in self.moe_ms:
            raise ConfigError(
                f"latency table has no MoE entry for experts={s.experts} top_k={s.top_k} "
                f"width={s.width}; re-measure it with a space that holds this shape"
            )
        return self.attention_ms + self.moe_ms[key]

    @torch.no_grad()
    def measure_direct(
        self,
        parent,
        subnets: Subnet | Sequence[Subnet],
        device: torch.device | str | None = None,
        repeats: int | None = None,
        warmup: int = 1,
    ) -> float | list[float]:
        """Milliseconds of the real `parent(tokens, subnet)` forward at the table's shape (same
        statistic and repeats as the table). A list of subnets is timed interleaved; returns a list."""
        device = torch.device(device or self.device)
        many = not isinstance(subnets, Subnet)
        subnets = list(subnets) if many else [subnets]
        was = parent.training
        parent.eval()
        tokens = _tokens(parent.config, self.batch, self.seq_len, device)
        fns = {n: (lambda sn=sn: parent(tokens, sn)) for n, sn in enumerate(subnets)}
        with autocast(device):
            ms = _time_ms(fns, device, repeats or self.repeats, warmup, self.statistic)
        parent.train(was)
        out = [ms[n] for n in range(len(subnets))]
        return out if many else out[0]

    def validate(self, subnets: Sequence[Subnet], parent=None, device=None, repeats: int | None = None) -> dict:
        """Relative error |predicted - measured| / measured on held-out sub-networks (mean, max)."""
        parent = parent if parent is not None else self.parent
        if parent is None:
            raise ConfigError("LatencyTable.validate needs the parent model (pass parent=...)")
        subnets = list(subnets)
        measured = self.measure_direct(parent, subnets, device, repeats) if subnets else []
        points = [
            {"subnet": str(sn), "predicted_ms": self.predict(sn), "measured_ms": m} for sn, m in zip(subnets, measured)
        ]
        for p in points:
            p["rel_error"] = abs(p["predicted_ms"] - p["measured_ms"]) / p["measured_ms"]
        return {**_error_summary([p["rel_error"] for p in points]), "points": points}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "elasticmoe-latency",
            "seq_len": self.seq_len,
            "batch": self.batch,
            "device": self.device,
            "repeats": self.repeats,
            "base_ms": self.base_ms,
            "attention_ms": self.attention_ms,
            "statistic": self.statistic,
            "moe_ms": [{"experts": e, "top_k": k, "width": w, "ms": ms} for (e, k, w), ms in self.moe_ms.items()],
            "meta": self.meta,
            **({"dense_layers": list(self.dense_layers), "dense_ms": self.dense_ms} if self.dense_layers else {}),
        }

    def save(self, path: Path | str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> LatencyTable:
        try:
            d = json.loads(Path(path).read_text())
            if d.get("format") != "elasticmoe-latency":
                raise ValueError("not an elasticmoe latency table")
            moe = {(m["experts"], m["top_k"], m["width"]): float(m["ms"]) for m in d["moe_ms"]}
            return cls(
                d["seq_len"],
                d["batch"],
                d["device"],
                d["repeats"],
                d["base_ms"],
                d["attention_ms"],
                moe,
                d["statistic"],
                d.get("meta", {}),
                tuple(d.get("dense_layers", ())),
                float(d.get("dense_ms", 0.0)),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read latency table {path}: {exc}") from None


def _error_summary(errs: list[float]) -> dict[str, Any]:
    return {
        "mean_rel_error": float(np.mean(errs)) if errs else None,
        "max_rel_error": float(max(errs)) if errs else None,
        "n": len(errs),
    }


def _tokens(c: ModelConfig, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, c.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)


def _rope(parent, seq_len: int, device: torch.device, dtype: torch.dtype):
    from .model import rope_cos_sin

    return rope_cos_sin(parent.inv_freq, torch.arange(seq_len, device=device), dtype)


def _base_forward(parent, tokens: torch.Tensor) -> torch.Tensor:
    x = parent.embed(tokens)
    _rope(parent, tokens.shape[1], tokens.device, x.dtype)
    weight = parent.embed.weight if parent.lm_head is None else parent.lm_head.weight
    return F.linear(parent.norm(x), weight)
