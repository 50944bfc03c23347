"""Peak resident memory of `import-hf` on a random >= 1B-parameter bf16 Mixtral (issue 25, item 3).

Target: the peak RSS of the import (read, check, save the run's parent) is at most 1.3x the
model's size on disk. The model is made with transformers' own MixtralConfig and random weights
(bf16, written by `save_pretrained` in shards), once, into OUT/src; each measured import then runs
in a fresh process, which reports its peak RSS (`VmHWM` of /proc/self/status, the kernel's
high-water mark of resident memory; a fresh Python with torch and transformers' safetensors
imported starts near 0.3 GB, included in the figure). `--code DIR` measures the importer of
another checkout (e.g. the float32 importer before this change) on the same folder.

    OMP_NUM_THREADS=1 python bench/bench_import_memory.py [OUT] [--code DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CONFIG = dict(  # 1.1B parameters: 8 layers of 20 experts of width 2048 on hidden 1024
    vocab_size=32000,
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    intermediate_size=2048,
    num_local_experts=20,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    sliding_window=None,
    tie_word_embeddings=False,
)

CHILD = """
import sys, time, pathlib
sys.path.insert(0, sys.argv[1])
from elasticmoe.hf_import import import_hf
from elasticmoe.checkpoint import save_model
t0 = time.perf_counter()
model = import_hf(sys.argv[2])
dtypes = sorted({str(p.dtype) for p in model.parameters()})
save_model(sys.argv[3], model, {"kind": "imported"})
seconds = time.perf_counter() - t0
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
import json
print(json.dumps({"peak_rss_bytes": hwm * 1024, "seconds": seconds, "params": model.num_params(), "dtypes": dtypes}))
"""


def make_source(src: Path) -> int:
    """The random bf16 model, saved in shards; returns its bytes on disk (safetensors files)."""
    if not (src / "config.json").is_file():
        import torch
        import transformers

        cfg = transformers.MixtralConfig(**CONFIG)
        torch.manual_seed(0)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        model.save_pretrained(src, max_shard_size="600MB")
    return sum(f.stat().st_size for f in src.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="runs/bench-import-memory")
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="checkout whose importer runs")
    args = ap.parse_args()
    out = Path(args.out)
    disk = make_source(out / "src")
    dest = out / "imported"
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", CHILD, args.code, str(out / "src"), str(dest)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    rec.update(disk_bytes=disk, ratio=rec["peak_rss_bytes"] / disk, code=args.code)
    rec["imported_bytes"] = (dest / "model.safetensors").stat().st_size
    print(json.dumps(rec))
    print(
        f"{rec['params'] / 1e9:.2f}B params, {disk / 2**30:.2f} GiB on disk ({rec['dtypes']}): import peak RSS "
        f"{rec['peak_rss_bytes'] / 2**30:.2f} GiB = {rec['ratio']:.2f}x the disk size, {rec['seconds']:.0f} s; "
        f"the run's parent is {rec['imported_bytes'] / 2**30:.2f} GiB"
    )


if __name__ == "__main__":
    main()
