"""Running a model one block at a time: what each block receives, one block's forward, and
what the model makes of the last block's outputs (its head) without running any block.

Both rest on stand-ins: every block swapped for a module that does not compute, so the
model's own forward runs everything around its blocks — embeddings, the masks and position
embeddings each block gets (which differ between blocks in models that mix sliding-window and
global attention, as Gemma 3 does), the final norm, the head and softcaps. `capture` records
what each block receives (stand-ins that pass their input through); `tail` makes the model
compute its outputs from given last-block outputs (stand-ins that return them).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from svdq.models.layers import blocks_of


class _Standin(nn.Module):
    """Stands in for block `index`: `fn(index, hidden, args, kwargs)` says what it returns.
    Attributes the model's forward reads off its blocks (`attention_type`, ...) are the
    original block's."""

    def __init__(self, block: nn.Module, index: int, fn: Callable) -> None:
        super().__init__()
        self.__dict__["_block"] = block  # not a submodule: its weights may be on meta
        self.__dict__["_call"] = (index, fn)

    def forward(self, *args, **kwargs):
        index, fn = self.__dict__["_call"]
        hidden = args[0] if args else kwargs.pop("hidden_states")
        return fn(index, hidden, args[1:], kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


@contextlib.contextmanager
def standins(model: nn.Module, fn: Callable) -> Iterator[None]:
    """Within the body every block of `model` is a `_Standin` calling `fn`; the blocks are
    put back afterwards, whatever happens."""
    _, blocks = blocks_of(model)
    saved = list(blocks)
    try:
        for i, b in enumerate(saved):
            blocks[i] = _Standin(b, i, fn)
        yield
    finally:
        for i, b in enumerate(saved):
            blocks[i] = b


@dataclass
class Captured:
    """The first block's hidden states per batch, and what every block receives besides them:
    `kwargs[i][b]` for block i and batch b (positional extras under "_args")."""

    hidden: list[torch.Tensor]
    kwargs: list[list[dict]]


class _Captured(Exception):
    """Raised by the last stand-in: what follows the blocks (the final norm and the head, whose
    logits are batch × len × vocab floats: 805 MB for 8 × 512 tokens at a 49,152 vocabulary)
    never runs."""


def inputs(batch: torch.Tensor) -> dict:
    """A model's keyword inputs for a calibration batch: token ids (integers), or an image
    model's pixel values (floats, (batch, channels, height, width))."""
    if batch.is_floating_point():
        return {"pixel_values": batch}
    return {"input_ids": batch, "attention_mask": torch.ones_like(batch), "use_cache": False}


def capture(model: nn.Module, ids: torch.Tensor, batch_size: int) -> Captured:
    """Run `model` on `ids` in batches with stand-ins for its blocks, and record what each
    block receives. No block computes, and the forward stops after the last stand-in: this
    costs the embeddings and masks only."""
    _, blocks = blocks_of(model)
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in blocks]

    def record(i: int, h: torch.Tensor, args: tuple, kw: dict) -> torch.Tensor:
        kwargs[i].append({**kw, **({"_args": args} if args else {})})
        if i == 0:
            hidden.append(h)
        if i == len(blocks) - 1:
            raise _Captured
        return h

    device = next(p for p in model.parameters() if p.device.type != "meta").device
    with standins(model, lambda i, h, args, kw: record(i, h, args, kw)), torch.no_grad():
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start: start + batch_size].to(device)
            try:
                model(**inputs(batch))
            except _Captured:
                pass
    return Captured(hidden, kwargs)


def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One block's forward on captured inputs (under autograd if the caller enables it)."""
    kw = dict(kwargs)
    args = kw.pop("_args", ())
    out = block(hidden, *args, **kw)
    return out[0] if isinstance(out, tuple) else out


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return call_block(block, hidden, kwargs)


@contextlib.contextmanager
def tail(model: nn.Module) -> Iterator[dict]:
    """Within the body, `model` computes its outputs from `cell["value"]` (set it to the last
    block's outputs) instead of running its blocks; the blocks are put back afterwards."""
    cell: dict = {"value": None}
    with standins(model, lambda i, h, args, kw: cell["value"]):
        yield cell
