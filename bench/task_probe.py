"""How fast does a model learn one structured task? A probe outside the pipeline (issue 13).

Trains a fresh model on rows packed with freshly generated examples of ONE task (an endless
stream, no repeats) and prints, every 50 steps, the teacher-forced accuracy and loss on the answer
tokens of that step's batch (for kv: the digits of every query's value). Answer-token accuracy is
an upper bound on exact match (all of an answer's tokens must be right for exact match).

    OMP_NUM_THREADS=1 python bench/task_probe.py --run runs/default --task kv --steps 500
    OMP_NUM_THREADS=1 python bench/task_probe.py --run runs/default --task kv --model dense
    OMP_NUM_THREADS=1 python bench/task_probe.py --run runs/default --task kv --answers-only

--run names a run folder whose tokenizer is used. --model elastic is the `tiny` parent's shape
(elasticmoe.model.ElasticMoE, full network); --model dense is a plain pre-norm GPT built from
torch.nn.TransformerEncoderLayer with learned positions (same width, depth and heads, FFN 4x),
a check that the MoE model is not the reason a task is slow to learn. --answers-only puts the
loss on the answer tokens only. Results: bench/TASKS.md.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn.functional as F

from elasticmoe import data
from elasticmoe.config import ModelConfig
from elasticmoe.model import ElasticMoE
from elasticmoe.tokenizer import load_tokenizer


class DenseGPT(torch.nn.Module):
    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, max_len: int = 256):
        super().__init__()
        self.emb, self.pos = torch.nn.Embedding(vocab, d_model), torch.nn.Embedding(max_len, d_model)
        layer = torch.nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, 0.0, "gelu", batch_first=True, norm_first=True
        )
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = torch.nn.LayerNorm(d_model), torch.nn.Linear(d_model, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(T)
        h = self.blocks(self.emb(x) + self.pos(torch.arange(T)), mask=mask, is_causal=True)
        return self.head(self.norm(h))


def answer_mask(task: str, tokens: list[int], tok) -> list[int]:
    """1 on answer tokens: for kv every query's value digits, else the tokens after the separator."""
    pieces = [tok.decode([t]) for t in tokens]
    if task == "kv":
        first = next(i for i, p in enumerate(pieces) if p.strip() == "?")
        return [int(i > first and p.strip().isdigit()) for i, p in enumerate(pieces)]
    return []  # filled by the caller from the prompt length


def make_row(task: str, rng: random.Random, tok, length: int, single: bool = False) -> tuple[list[int], list[int]]:
    """One row of `length` tokens and its answer mask. single: one example, then padding (mask -1:
    no loss), so no earlier example's keys are in view; else examples packed back to back."""
    ids, mask = [tok.eos_id], [0]
    while len(ids) < length:
        if single and len(ids) > 1:
            pad = length - len(ids)
            return ids + [tok.eos_id] * pad, mask + [-1] * pad
        example = data.make_example(task, rng)
        tokens = tok.encode(example)
        if task == "kv":
            m = answer_mask(task, tokens, tok)
        else:
            prompt, _ = data.split_prompt_answer(task, example)
            n = len(tok.encode(prompt))
            m = [0] * n + [1] * (len(tokens) - n)
        ids += tokens + [tok.eos_id]
        mask += m + [0]
    return ids[:length], mask[:length]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/default", help="run folder whose data/tokenizer.json is used")
    p.add_argument("--task", default="kv", choices=data.STRUCTURED_TASKS)
    p.add_argument("--model", default="elastic", choices=("elastic", "dense"))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--answers-only", action="store_true")
    p.add_argument("--single", action="store_true", help="one example per row (padded), none packed beside it")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    tok = load_tokenizer(f"{a.run}/data")
    V = tok.vocab_size
    if a.model == "elastic":
        c = ModelConfig(
            vocab_size=V, d_model=128, layers=4, heads=4, kv_heads=2, head_dim=32, experts=8, top_k=2, expert_width=256
        )
        model = ElasticMoE(c)
        model.init_weights()
        forward = lambda x: model(x).logits  # noqa: E731
    else:
        model = DenseGPT(V, 128, 4, 4)
        forward = model
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    t0 = time.perf_counter()
    print(
        f"task {a.task} model {a.model} batch {a.batch}x{a.seq_len} lr {a.lr} answers-only {a.answers_only} "
        f"single {a.single}"
    )
    for step in range(a.steps + 1):
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / a.warmup) * cosine
        rows = [make_row(a.task, rng, tok, a.seq_len + 1, a.single) for _ in range(a.batch)]
        x = torch.tensor([r[0] for r in rows])
        mask = torch.tensor([r[1] for r in rows])[:, 1:]
        m = mask == 1
        inputs, targets = x[:, :-1], x[:, 1:]
        logits = forward(inputs)
        keep = m if a.answers_only else mask >= 0
        loss = F.cross_entropy(logits[keep], targets[keep])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                acc = (logits.argmax(-1) == targets)[m].float().mean().item()
                answer_loss = F.cross_entropy(logits[m], targets[m]).item()
            print(
                f"step {step:5d}  tokens {(step + 1) * a.batch * a.seq_len:9,d}  answer-loss {answer_loss:.3f}  "
                f"answer-token-acc {acc:.3f}  {time.perf_counter() - t0:5.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
