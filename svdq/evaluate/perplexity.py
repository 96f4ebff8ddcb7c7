"""Sliding-window perplexity: the text, its tokens, the windows, the score."""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from svdq.errors import SvdqError

# 16 windows of 1024 tokens: a few seconds to a minute per model on a CPU for ~100M parameters,
# and the artifact and its baseline score the very same tokens, so their difference is far
# more precise than either perplexity alone. 0 uses the whole text.
DEFAULT_MAX_TOKENS = 16384
Progress = Callable[[str, int, int], None]  # (stage, done, total), as in svdq.pipeline
CTX_CAP = 1024  # default window: the model's context, at most this (memory grows with ctx·vocab)


def read_text(spec: str) -> tuple[str, str]:
    """(text, label) for `--ppl`: "wikitext" (WikiText-2 raw test) or a UTF-8 file."""
    if spec == "wikitext":
        return _wikitext_test(), "WikiText-2 test"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise SvdqError(f"text file {spec} does not exist; give a UTF-8 text file or wikitext")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SvdqError(f"cannot read {spec} ({e.__class__.__name__}); give a UTF-8 text file") from None
    if not text.strip():
        raise SvdqError(f"text file {spec} is empty; give a file with text in it")
    return text, str(path)


def _wikitext_test() -> str:
    try:
        import datasets
    except ImportError:
        raise SvdqError("--ppl wikitext needs the `datasets` package (pip install datasets) and "
                        "the Hugging Face hub; or give a local text file: --ppl FILE") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as e:  # noqa: BLE001 - offline, missing from the cache, ...: one message
        raise SvdqError(f"WikiText-2 cannot be loaded ({e.__class__.__name__}: offline?); "
                        "give a local text file: --ppl FILE") from None
    return "\n\n".join(data["text"])


def tokenize(tokenizer, text: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> torch.Tensor:
    """1-D token ids of `text` without special tokens, the first `max_tokens` (0: all)."""
    if max_tokens < 0:
        raise SvdqError(f"--max-tokens must be ≥ 0 (0: the whole text), got {max_tokens}")
    with warnings.catch_warnings():  # "sequence longer than the model's maximum": we window it
        warnings.simplefilter("ignore")
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = ids[:max_tokens] if max_tokens else ids
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- perplexity
def max_context(model: nn.Module) -> int | None:
    """The longest input the model's positions allow, where its config says."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_ctx(model: nn.Module) -> int:
    limit = max_context(model)
    return min(limit, CTX_CAP) if limit else CTX_CAP


def windows(n: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window: tokens [begin, end) go in, [first, end) are scored.

    Windows start at 0, stride, 2·stride, … and stop once one reaches the end. Each scores the
    tokens no earlier window scored that have context inside it: with stride < ctx every token
    but the text's first exactly once; with stride == ctx each window's first token is lost.
    """
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        first = max(prev_end, begin + 1)
        if first < end:  # a 1-token tail window with nothing to score needs no forward pass
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def check_windows(model: nn.Module, ctx: int, stride: int) -> None:
    """Refuse a window the model cannot take or a stride that skips tokens."""
    limit = max_context(model)
    if ctx < 2:
        raise SvdqError(f"--ctx must be at least 2 tokens, got {ctx}")
    if limit and ctx > limit:
        raise SvdqError(f"--ctx {ctx} exceeds the model's context of {limit} tokens; "
                        f"use --ctx {limit} or less")
    if not 1 <= stride <= ctx:
        raise SvdqError(f"--stride must lie in [1, ctx={ctx}], got {stride}; stride < ctx "
                        "overlaps windows, stride = ctx does not")


def check_options(ctx: int | None, stride: int | None, max_tokens: int, batch_size: int,
                  device: str) -> None:
    """What can be refused before any model is loaded (None: the default)."""
    if stride is not None and stride < 1:
        raise SvdqError(f"--stride must be at least 1, got {stride}")
    if ctx is not None and stride is not None and stride > ctx:
        raise SvdqError(f"--stride {stride} exceeds --ctx {ctx}; windows would skip tokens")
    if max_tokens < 0:
        raise SvdqError(f"--max-tokens must be ≥ 0 (0: the whole text), got {max_tokens}")
    if batch_size < 1:
        raise SvdqError(f"--batch-size must be at least 1, got {batch_size}")
    if device != "cpu" and not device.startswith("cuda"):
        raise SvdqError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SvdqError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")


def perplexity(model: nn.Module, ids: torch.Tensor, ctx: int | None = None,
               stride: int | None = None, batch_size: int = 1,
               progress: Progress | None = None) -> dict:
    """Sliding-window perplexity of a causal LM on 1-D token ids (see `windows`).

    The NLL of every scored token comes from log_softmax of the logits, gathered and summed in
    float64 (not the model's mean loss, whose averaging over uneven windows is lossy).
    Full-length windows run `batch_size` at a time. tokens_per_s counts scored tokens.
    """
    if not getattr(model, "can_generate", lambda: False)():
        raise SvdqError(f"perplexity needs a causal LM, {type(model).__name__} is not one; "
                        "use --similarity for encoders")
    ctx = ctx or default_ctx(model)
    stride = stride or ctx
    check_windows(model, ctx, stride)
    check_options(ctx, stride, 0, batch_size, "cpu")
    n = int(ids.numel())
    if n < 2:
        raise SvdqError(f"the text has {n} token(s); perplexity needs at least 2, give a longer text")
    report = progress or (lambda stage, done, total: None)
    plan = windows(n, ctx, stride)
    # group windows of equal length (all but possibly the last are ctx long) into batches
    batches: list[list[tuple[int, int, int]]] = []
    for w in plan:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0][1] - last[0][0] == w[1] - w[0]:
            last.append(w)
        else:
            batches.append([w])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the same command gives the same numbers
    total_nll, scored, done = 0.0, 0, 0
    report("perplexity", 0, len(plan))
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in batches:
                x = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)
                logits = model(input_ids=x, use_cache=False).logits
                for row, (b, e, f) in enumerate(batch):
                    # logits at position p predict token p+1: tokens [f, e) use [f-1, e-1)
                    logp = torch.log_softmax(logits[row, f - 1 - b: e - 1 - b].float(), dim=-1)
                    target = x[row, f - b: e - b].unsqueeze(-1)
                    total_nll -= logp.gather(-1, target).double().sum().item()
                    scored += e - f
                done += len(batch)
                report("perplexity", done, len(plan))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    return {"ppl": math.exp(total_nll / scored), "nll": total_nll / scored,
            "tokens_scored": scored, "tokens_processed": sum(e - b for b, e, _ in plan),
            "windows": len(plan), "ctx": ctx, "stride": stride, "seconds": seconds,
            "tokens_per_s": scored / seconds if seconds > 0 else float("inf")}


