"""Extraction: slice one sub-network out of the elastic parent into a standalone child.

The child is an ordinary `ElasticMoE` of its own `ModelConfig` (`cost.child_config`; a per-layer
sub-network gives a config with `layer_shapes`). It holds contiguous copies of exactly what the
sub-network touches:

* the kept layers, renumbered 0..depth-1 in parent order (a block's position is computation);
* in each, the first `experts` router rows and experts, and the first `width` neurons of each
  kept expert (rows of `w_gate`/`w_up`, columns of `w_down`): importance re-ordering has made
  these prefixes the best ones;
* the router's selection bias (ERNIE-4.5) sliced with its experts;
* attention, q/k norms, block norms, the shared expert and dense layers' MLPs unchanged;
  embeddings, final norm and LM head unchanged.

`child.layer_order` is the parent's keep-priority order restricted to the kept layers and
renumbered, so shrinking the child further drops layers in the same order as the parent would.

Verification is built in: `extract_to_folder` runs the parent restricted to the sub-network and the
child on held-out tokens and refuses to write unless the logits agree to `tolerance` (max abs
difference, float32), and unless the child's parameter count equals `cost.cost(...).total_params`.
Loading a child is `checkpoint.load_model(folder)`: nothing of the parent is needed.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import ConfigError
from .cost import child_config, cost
from .model import ElasticMoE
from .subnet import Subnet

log = logging.getLogger(__name__)

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


class ExtractionError(ConfigError):
    """The extracted child does not reproduce the parent's sub-network (nothing was written)."""


def _slice(name: str, tensor: torch.Tensor, experts: int, width: int) -> torch.Tensor:
    """The prefix of a block tensor that a layer keeping `experts` experts of `width` neurons uses."""
    if name in ("moe.router.weight", "moe.router_bias"):  # (E, D), (E,): the selection bias follows its expert
        return tensor[:experts]
    if name in ("moe.w_gate", "moe.w_up"):  # (E, W, D)
        return tensor[:experts, :width]
    if name == "moe.w_down":  # (E, D, W)
        return tensor[:experts, :, :width]
    return tensor


def child_state_dict(parent: ElasticMoE, subnet: Subnet) -> dict[str, torch.Tensor]:
    """Contiguous copies of the parent tensors the child keeps, under the child's key names."""
    parent_state = parent.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in parent_state.items():
        m = _BLOCK_KEY.fullmatch(key)
        if m is None:  # embeddings, final norm, LM head
            out[key] = tensor
            continue
        layer, name = int(m.group(1)), m.group(2)
        if layer not in subnet.layers:
            continue
        slot = subnet.layers.index(layer)
        spec = subnet.specs[slot]
        out[f"blocks.{slot}.{name}"] = _slice(name, tensor, spec.experts, spec.width)
    return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in out.items()}


def child_layer_order(parent_order: list[int], kept: tuple[int, ...]) -> list[int]:
    """The parent's keep-priority order restricted to the kept layers, renumbered to child slots."""
    slot = {layer: n for n, layer in enumerate(kept)}
    order = [slot[i] for i in parent_order if i in slot]
    missing = [n for n in range(len(kept)) if n not in order]  # a parent order that omits layers
    return order + missing


@torch.no_grad()
def extract(parent: ElasticMoE, subnet: Subnet) -> ElasticMoE:
    """A standalone child whose logits equal `parent(tokens, subnet)` (to float tolerance)."""
    subnet = parent.resolve(subnet)
    config = child_config(parent.config, subnet)
    state = child_state_dict(parent, subnet)
    with torch.device("meta"):  # no allocation or random init for tensors about to be replaced
        child = ElasticMoE(config)
    # assign=True adopts our copies (with the parent's device and dtype); the RoPE table depends
    # only on head_dim and theta, which the child shares, so it is a copy of the parent's too.
    child.load_state_dict(state, strict=True, assign=True)
    child.inv_freq = parent.inv_freq.detach().clone()
    left = [n for n, t in [*child.named_parameters(), *child.named_buffers()] if t.is_meta]
    if left:
        raise ExtractionError(f"extraction left tensors {left} unset; extract.py does not know them")
    child.layer_order = child_layer_order(list(parent.layer_order), subnet.layers)
    return child


def _token_rows(tokens: torch.Tensor, max_len: int) -> list[torch.Tensor]:
    """(B, T) tokens as they are, or a 1-D stream cut into rows of at most `max_len`."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() == 1:
        return [tokens[i : i + max_len][None] for i in range(0, tokens.numel(), max_len)]
    if tokens.dim() != 2:
        raise ConfigError(f"verification tokens must be 1-D or (batch, time); got shape {tuple(tokens.shape)}")
    return [tokens[:, i : i + max_len] for i in range(0, tokens.shape[1], max_len)]


@torch.no_grad()
def verify(parent: ElasticMoE, subnet: Subnet, child: ElasticMoE, tokens: torch.Tensor) -> float:
    """Max abs difference (float32) between `parent(tokens, subnet)` and `child(tokens)` logits.

    A 1-D token stream, or a sequence longer than `max_seq_len`, is cut into chunks of at most
    `max_seq_len`; each chunk is a fresh sequence for both models. NaN anywhere gives NaN.
    """
    device = parent.embed.weight.device
    worst = 0.0
    for row in _token_rows(tokens, parent.config.max_seq_len):
        row = row.to(device)
        a = parent(row, subnet).logits.float()
        b = child(row.to(child.embed.weight.device)).logits.float().to(device)
        diff = (a - b).abs().max().item()  # NaN propagates through max
        if math.isnan(diff):
            return diff
        worst = max(worst, diff)
    return worst


def _parent_identity(parent: ElasticMoE, parent_meta: dict[str, Any] | None) -> dict[str, Any]:
    """What names the parent: whatever the caller passed, the parent config, and the checksum of the
    parent's weights when the caller's `path` is a checkpoint folder with a manifest."""
    identity: dict[str, Any] = dict(parent_meta or {})
    identity.setdefault("config", parent.config.to_dict())
    identity.setdefault("layer_order", list(parent.layer_order))
    path = identity.get("path")
    if path is not None:
        identity["path"] = str(path)
        manifest = Path(path) / checkpoint.MANIFEST
        if manifest.is_file() and "model_sha256" not in identity:
            files = checkpoint.read_json(manifest).get("files", {})
            if "model.safetensors" in files:
                identity["model_sha256"] = files["model.safetensors"]["sha256"]
    return identity


def extract_to_folder(
    parent: ElasticMoE,
    subnet: Subnet,
    out_dir: str | Path,
    tokens: torch.Tensor,
    tokenizer_path: str | Path | None = None,
    parent_meta: dict[str, Any] | None = None,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Extract, verify on held-out `tokens`, and write a child folder; return its meta.

    Raises ExtractionError (a ConfigError) and writes nothing at `out_dir` when the logits differ
    by more than `tolerance` or the parameter count differs from the cost model. The folder is
    written atomically by `checkpoint.save_model`, with `tokenizer.json` copied in if given.
    """
    subnet = parent.resolve(subnet)
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise ConfigError(f"tokenizer_path {tokenizer_path} is not a file")
    child = extract(parent, subnet)
    n_tokens = int(torch.as_tensor(tokens).numel())
    if n_tokens == 0:
        raise ExtractionError("verification needs held-out tokens; got none")
    max_diff = verify(parent, subnet, child, tokens)
    if not max_diff <= tolerance:  # also refuses NaN
        raise ExtractionError(
            f"extraction of {subnet} failed verification: max abs logit difference {max_diff:.3g} "
            f"exceeds tolerance {tolerance:g} on {n_tokens} tokens; nothing written to {out_dir}"
        )
    expected = cost(parent.config, subnet)
    params = child.num_params()
    if params != expected.total_params:
        raise ExtractionError(
            f"extracted child has {params} parameters but the cost model says {expected.total_params} "
            f"for {subnet}; nothing written to {out_dir}"
        )
    meta = {
        "kind": "child",
        "parent": _parent_identity(parent, parent_meta),
        "subnet": str(subnet),
        "subnet_json": subnet.to_dict(),
        "verification": {
            "max_abs_logit_diff": max_diff,
            "tolerance": tolerance,
            "tokens_verified": n_tokens,
            "dtype": "float32",
        },
        "params": expected.total_params,
        "active_params": expected.active_params,
        "flops_forward_per_token": expected.flops_forward,
        "flops_seq_len": expected.seq_len,
    }
    extra = {"tokenizer.json": Path(tokenizer_path)} if tokenizer_path is not None else None
    checkpoint.save_model(out_dir, child, meta=meta, extra_files=extra)
    log.info(
        "extracted %s: %d params (%d active), max logit diff %.2e -> %s",
        subnet,
        params,
        expected.active_params,
        max_diff,
        out_dir,
    )
    return meta


__all__ = ["ExtractionError", "child_layer_order", "child_state_dict", "extract", "extract_to_folder", "verify"]
