"""The export stage: a model folder (a child, a fine-tuned child, a parent) written in another
tool's format, checked against our logits before it is published; called alike by `elasticmoe
export` and the pipeline's export phase.

    hf     a stock transformers folder (MixtralForCausalLM / Qwen3MoeForCausalLM), see hf.py
    gguf   a llama.cpp GGUF file (f32, f16 or q8_0), see gguf_export.py

The check runs on held-out validation tokens of a run: `run_dir`'s when given, else those of the
run the model came from, else (a folder outside any run) random token ids, and the record says
which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ConfigError
from .phases import model_folder, val_tokens

FORMATS = ("hf", "gguf")


def export_model(
    model_dir: Path | str,
    out: Path | str,
    fmt: str = "hf",
    gguf_type: str = "f32",
    run_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Export the model folder at `model_dir` (or a run's `parent/`, a fine-tune's `model/`) to
    `out` in format `fmt`; returns the export's record (hf: its provenance with
    `hf_verification`; gguf: the GGUF export record)."""
    from .gguf_export import export_gguf, held_out_tokens
    from .hf import export_hf

    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r}; allowed {list(FORMATS)}")
    src = model_folder(model_dir)
    tokens = val_tokens(run_dir, 2) if run_dir is not None else held_out_tokens(src)
    if fmt == "gguf":
        return export_gguf(src, Path(out), qtype=gguf_type, verify_tokens=tokens)
    return export_hf(src, Path(out), verify_tokens=tokens)
