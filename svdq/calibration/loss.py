"""What the model makes of a walk's last hidden states: the losses the gradient statistics and
the budget's judge use, computed through `models.blocks.tail` (the model's own head).

- causal LMs: the next-token cross-entropy of one sequence, summed over its tokens, with the
  vocabulary-wide logits made a chunk of positions at a time (`logits_to_keep`), so a 262k
  vocabulary costs tens of MB, not a GB;
- encoders: the last hidden states (`last_hidden_state`, else the last of `hidden_states`);
- image classifiers: the class logits (their KL to the source's is the judge's loss; the
  cross-entropy against the source's own top-1 class is the gradients' loss).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

LOGIT_BYTES = 64 * 2 ** 20  # float32 logits made at once, at most
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU flags of native bfloat16 products


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(w for line in text.splitlines() if line.startswith("flags")
                     for w in line.partition(":")[2].split())


def native_bf16(device: torch.device | str) -> bool:
    """Whether bfloat16 matrix products are native on `device`, so faster than float32 there:
    a CUDA device that has them, a CPU with AVX512-BF16 or AMX (on 2 AVX512-BF16 cores
    Gemma-3-270M's 262,144-word head ran 2.1x faster: `pipeline.fast`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(f in _cpu_flags() for f in BF16_FLAGS)


class _Bf16Head(nn.Module):
    """A linear head multiplying in bfloat16: its weight cast once (an autocast casts it on
    every call — per chunk of logits, 0.1 s each at 262,144 × 640), float32 logits out."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.weight = head.weight.detach().to(torch.bfloat16)
        self.bias = None if head.bias is None else head.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).float()


@contextlib.contextmanager
def bf16_head(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the body, `model`'s output head (a plain float32 linear layer: not one a plan
    stores) multiplies in bfloat16 from a copy of its weight made here (half its float32
    bytes); put back afterwards, whatever happens. A no-op unless `enabled`."""
    head = model.get_output_embeddings() if enabled else None
    if type(head) is not nn.Linear or head.weight.dtype != torch.float32:
        yield
        return
    low = _Bf16Head(head)
    try:
        model.set_output_embeddings(low)
        swapped = model.get_output_embeddings() is low  # a model that cannot swap: as it is
        if not swapped:
            model.set_output_embeddings(head)
    except (AttributeError, NotImplementedError):
        swapped = False
    try:
        yield
    finally:
        if swapped:
            model.set_output_embeddings(head)


def keeps_logits(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def draw(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row of `logits` (rows, vocab), drawn from its softmax by inverting the
    cumulative distribution (6× faster than `torch.multinomial` at 262,144 words)."""
    cdf = torch.softmax(logits.detach().float(), -1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u)[:, 0].clamp(max=cdf.shape[1] - 1)


def token_loss(model: nn.Module, cell: dict, hidden: torch.Tensor, ids: torch.Tensor,
               backward: bool = False, drawn: torch.Generator | None = None) -> float:
    """Σ over the next-token predictions of one sequence `ids` (1, T) of its cross-entropy,
    the model's head applied to `hidden` (1, T, h), the last block's outputs, inside
    `blocks.tail(model)` (whose `cell` this is). With `backward` the sum, divided by T − 1
    (the mean transformers computes for labels=ids), is backpropagated into `hidden` chunk
    by chunk, so only one chunk's logits exist at a time. `drawn`: each position's label
    drawn from the model's own next-token distribution (by this generator) instead of the
    text's next token — the gradients' squares are then the Fisher information's, not the
    empirical Fisher's (`calibration.gradients`)."""
    n = ids.shape[1] - 1
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 1
    step = max(1, LOGIT_BYTES // (4 * vocab)) if keeps_logits(model) else n
    mask = torch.ones_like(ids)
    total = 0.0
    for start in range(0, n, step):
        stop = min(start + step, n)
        cell["value"] = hidden
        keep = {} if step >= n else {"logits_to_keep": torch.arange(start, stop, device=ids.device)}
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **keep).logits
        logits = logits[0] if keep else logits[0, start:stop]
        labels = ids[0, start + 1: stop + 1] if drawn is None else draw(logits, drawn)
        part = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        if backward:
            (part / n).backward()
        total += float(part.detach())
    return total


def final_states(model: nn.Module, cell: dict, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """An encoder's last hidden states for `ids`, the last block's outputs being `hidden`."""
    cell["value"] = hidden
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    h = getattr(out, "last_hidden_state", None)
    return out.hidden_states[-1] if h is None else h


def class_logits(model: nn.Module, cell: dict, hidden: torch.Tensor,
                 pixels: torch.Tensor) -> torch.Tensor:
    """An image classifier's logits (float32) for `pixels`, the last block's outputs being
    `hidden`."""
    cell["value"] = hidden
    return model(pixel_values=pixels).logits.float()


def kl_sum(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Σ over samples of KL(softmax(reference) ‖ softmax(logits)), in float64."""
    ref = torch.log_softmax(reference.double(), -1)
    return float((ref.exp() * (ref - torch.log_softmax(logits.double(), -1))).sum())
