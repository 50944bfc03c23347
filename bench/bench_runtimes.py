"""Decode speed of one child in three runtimes, one thread each: llama.cpp (GGUF), transformers, elasticmoe.

    OMP_NUM_THREADS=1 python bench/bench_runtimes.py [--child CHILD_DIR] [--new-tokens 200] [--repeats 3]

Without `--child` it builds a child of the default recipe's parent (`tiny` preset) with random
weights (decode speed does not depend on training): `--subnet` picks it (default `L3 E4 k1 W128`,
the shape of the default run's children). Each arm generates `--new-tokens` greedy tokens after a
16-token prompt with a KV cache, one token per step; the arms run interleaved, `--repeats` times,
and the median tokens/s of each is reported with its ratio to transformers. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from elasticmoe.checkpoint import load_model
from elasticmoe.config import ModelConfig
from elasticmoe.data import build_default_corpus
from elasticmoe.extract import extract_to_folder
from elasticmoe.gguf_export import LlamaCpp, export_gguf
from elasticmoe.hf import export_hf
from elasticmoe.model import ElasticMoE
from elasticmoe.recipe import load_recipe
from elasticmoe.subnet import Subnet
from elasticmoe.tokenizer import train_tokenizer


def build_child(work: Path, spec: str) -> Path:
    recipe = load_recipe("tiny")
    texts = build_default_corpus(seed=0, scale=0.2).texts("train")
    tok = train_tokenizer(texts, recipe.model.vocab_size, work / "tok")
    config = ModelConfig(**{**recipe.model.to_dict(), "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    parent = ElasticMoE(config).eval()
    subnet = Subnet.parse(spec, config)
    tokens = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    extract_to_folder(parent, subnet, work / "child", tokens, tokenizer_path=work / "tok" / "tokenizer.json")
    return work / "child"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--subnet", default="L3 E4 k1 W128")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers

    work = Path(tempfile.mkdtemp(prefix="bench-runtimes-"))
    child = Path(args.child) if args.child else build_child(work, args.subnet)
    model, _ = load_model(child)
    model.eval()
    export_hf(child, work / "hf")
    export_gguf(child, work / "gguf", qtype="f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(work / "hf"), dtype=torch.float32).eval()
    c = model.config
    new = min(args.new_tokens, c.max_seq_len - 16)
    prompt = torch.randint(0, c.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    llama = LlamaCpp(work / "gguf" / "model-f32.gguf", n_ctx=c.max_seq_len, threads=1)

    def run_ours():
        with torch.no_grad():
            return model.generate(prompt, new)[0, 16:].tolist()

    def run_hf():
        with torch.no_grad():
            out = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None)
        return out[0, 16:].tolist()

    def run_llama():
        return llama.greedy(prompt[0].tolist(), new)

    arms = {"llama.cpp": run_llama, "transformers": run_hf, "elasticmoe": run_ours}
    rates: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.repeats):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            out = fn()
            rates[name].append(len(out) / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        json.dumps(
            {
                "child": str(child),
                "config": c.to_dict(),
                "new_tokens": new,
                "threads": 1,
                "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
                "vs_transformers": {k: round(v / med["transformers"], 2) for k, v in med.items()},
                "runs": {k: [round(x, 1) for x in v] for k, v in rates.items()},
                "greedy_same_llama_vs_ours": run_llama() == run_ours(),
            }
        )
    )
    llama.close()


if __name__ == "__main__":
    main()
