"""Running a model one block at a time: what the first block receives, one block's forward,
and what the model makes of the last block's outputs (its head) without running any block.

A walk captures the first block's inputs once (`block_inputs`), then calls each block
directly on them (`run_block`). `tail` swaps every block for a stand-in that returns given
hidden states, so the model's own forward computes the rest — final norm, LM head, softcaps,
whatever the architecture does after its blocks — from the hidden states a walk produced.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from svdq.models.layers import blocks_of


class _Stop(Exception):
    """Raised inside the first block once its inputs are captured."""


def block_inputs(model: nn.Module, first_block: nn.Module, ids: torch.Tensor,
                 batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """Run the embeddings on each batch and capture what the first block receives.

    Returns one (hidden_states, other keyword arguments) pair per batch: the rest of the walk
    calls each block directly, so the head (lm_head) is never computed.
    """
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {**kwargs, **({} if not args[1:] else {"_args": args[1:]})}))
        raise _Stop

    device = next(p for p in model.parameters() if p.device.type != "meta").device
    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, ids.shape[0], batch_size):
            batch = ids[i: i + batch_size].to(device)
            with contextlib.suppress(_Stop), torch.no_grad():
                model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    finally:
        handle.remove()
    return captured


def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One block's forward on captured inputs (under autograd if the caller enables it)."""
    kw = dict(kwargs)
    args = kw.pop("_args", ())
    out = block(hidden, *args, **kw)
    return out[0] if isinstance(out, tuple) else out


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return call_block(block, hidden, kwargs)


class _Replay(nn.Module):
    """Stands in for a block: returns the hidden states in `cell`, whatever it is given.
    Attributes the model's forward reads off its blocks (Gemma 3's `attention_type`, ...) are
    the original block's."""

    def __init__(self, block: nn.Module, cell: dict) -> None:
        super().__init__()
        self.__dict__["_block"] = block  # not a submodule: its weights may be on meta
        self.__dict__["_cell"] = cell

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.__dict__["_cell"]["value"]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


@contextlib.contextmanager
def tail(model: nn.Module) -> Iterator[dict]:
    """Within the body, `model` computes its outputs from `cell["value"]` (set it to the last
    block's outputs) instead of running its blocks; the blocks are put back afterwards."""
    _, blocks = blocks_of(model)
    saved = list(blocks)
    cell: dict = {"value": None}
    try:
        for i, b in enumerate(saved):
            blocks[i] = _Replay(b, cell)
        yield cell
    finally:
        for i, b in enumerate(saved):
            blocks[i] = b
