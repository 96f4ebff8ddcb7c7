"""Held-out KL: the mean per-token KL(source ‖ artifact) of the next-token distributions on the
first tokens of a text file, in non-overlapping windows, beside each artifact's perplexity on the
same windows. `svdq finetune` validates on the tail of its training text; this says whether a fall
of that validation KL carries over to text the run never saw.

    python benchmarks/heldout_kl.py EVAL.txt ART1 ART2 ... [--ctx 1024] [--max-tokens 16384]

The source is read from the first artifact's manifest (all must share it). Prints one JSON line
per artifact: kl, ppl (the artifact's) and the source's ppl on the same tokens.
"""
import argparse
import json
import math

import torch

import svdq
from svdq.artifact import read
from svdq.evaluate import load_baseline
from svdq.evaluate.perplexity import read_text, tokenize
from svdq.recovery import tuned


def windows(tokenizer, path: str, ctx: int, max_tokens: int) -> torch.Tensor:
    """The text's tokens as `svdq eval` takes them, in (n, ctx) non-overlapping windows."""
    ids = tokenize(tokenizer, read_text(path)[0], max_tokens)
    n = len(ids) // ctx
    return ids[: n * ctx].view(n, ctx)


@torch.no_grad()
def measure(student, teacher, wins: torch.Tensor) -> dict:
    kl = nll_s = nll_t = 0.0
    count = 0
    for w in wins:
        ids = w[None]
        t = teacher(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        s = student(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        nxt = ids[0, 1:]
        kl += float((t.exp() * (t - s)).sum())
        nll_s -= float(s.gather(-1, nxt[:, None]).sum())
        nll_t -= float(t.gather(-1, nxt[:, None]).sum())
        count += len(nxt)
    return {"kl": kl / count, "ppl": math.exp(nll_s / count),
            "source_ppl": math.exp(nll_t / count), "tokens_scored": count}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("text")
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=16384)
    a = ap.parse_args()
    base = load_baseline(read(a.artifacts[0]))
    teacher = tuned.float32(base.model).eval()
    wins = windows(base.tokenizer, a.text, a.ctx, a.max_tokens)
    for path in a.artifacts:
        student = svdq.load(path, dequantize=True, dtype=torch.float32).eval()
        print(json.dumps({"artifact": path, "ctx": a.ctx, **measure(student, teacher, wins)}),
              flush=True)
        del student


if __name__ == "__main__":
    main()
