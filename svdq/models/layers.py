"""Which layers are compressed, how their weights are read, and swapping modules by name.

GPT-2's `Conv1D` stores its weight transposed, (in, out). Everything in svdq reads and writes
weights as (out, in) through `weight_of`, the one place that knows. Targets are the linear
layers (`nn.Linear`, GPT-2 `Conv1D`) inside the transformer blocks; embeddings, `lm_head` and
poolers lie outside the blocks and stay as they are. `include` narrows the targets and
`exclude` removes some, both with fnmatch patterns on module names.
"""
from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from svdq.errors import SvdqError
from svdq.runtime import set_module

__all__ = ["blocks_of", "conv1d_type", "is_linear", "set_module", "targets", "weight_of"]


def conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers without Conv1D
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as (out, in), whatever its storage."""
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.detach().T
    return module.weight.detach()


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer's list of blocks: the longest ModuleList that holds linear layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(is_linear(m) for m in module.modules()):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise SvdqError(f"{type(model).__name__} has no list of transformer blocks with linear "
                        "layers; svdq supports GPT-2, Llama-family and BERT-family models")
    return best


def targets(model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the layers to compress, in model order."""
    prefix, _ = blocks_of(model)
    linear = [name for name, m in model.named_modules() if is_linear(m)]
    inside = [name for name in linear if name.startswith(prefix + ".")]
    if include:
        outside = [n for n in linear if n not in inside and any(fnmatch(n, p) for p in include)]
        if outside:
            raise SvdqError(f"--include matches {outside[0]}, which lies outside the transformer "
                            "blocks; svdq compresses only layers inside the blocks")
        inside = [n for n in inside if any(fnmatch(n, p) for p in include)]
    chosen = [n for n in inside if not any(fnmatch(n, p) for p in exclude)]
    if not chosen:
        raise SvdqError(f"no layer of {type(model).__name__} is left to compress; loosen "
                        "--include/--exclude (module names look like "
                        f"{inside[0] if inside else linear[0] if linear else '...'})")
    return chosen


def fp16_bytes(module: nn.Module) -> int:
    """A target layer's weight and bias in float16: what --ratio is a fraction of."""
    bias = getattr(module, "bias", None)
    return 2 * (weight_of(module).numel() + (0 if bias is None else bias.numel()))
