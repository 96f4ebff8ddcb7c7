"""Which layers are compressed, how their weights are read, and swapping modules by name.

GPT-2's `Conv1D` stores its weight transposed, (in, out), and a `Conv2d` its kernel, (out, in,
kh, kw). Everything in svdq reads and writes weights as (out, in) — a convolution's as (out,
in·kh·kw) — through `weight_of`, the one place that knows. Targets are the linear layers
(`nn.Linear`, GPT-2 `Conv1D`) and the convolutions that can be factorized (`runtime.conv_of`:
not grouped or depthwise) inside the model's blocks; embeddings, `lm_head`, poolers, a
vision model's stem and classifier lie outside the blocks and stay as they are unless
`include` names them (layers of the head after the blocks, not tied to another's weight).
`include` narrows the targets and `exclude` removes some, both with fnmatch patterns on
module names.
"""
from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from svdq.errors import SvdqError
from svdq.runtime import conv_of, set_module

__all__ = ["blocks_of", "conv1d_type", "is_linear", "is_target", "set_module", "targets",
           "weight_of"]


def conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers without Conv1D
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_target(module: nn.Module) -> bool:
    """A layer svdq can compress: linear, or a convolution it can factorize."""
    return is_linear(module) or conv_of(module) is not None


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight of a target layer as (out, in), whatever its storage."""
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.detach().T
    if isinstance(module, nn.Conv2d):
        return module.weight.detach().reshape(module.weight.shape[0], -1)
    return module.weight.detach()


def ends(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The model's input embedding and output head (None where it has none: transformers
    raises for models without them)."""
    out = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        try:
            out.append(getattr(model, get)())
        except (AttributeError, NotImplementedError):
            out.append(None)
    return out[0], out[1]


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of blocks: the ModuleList that holds the most target layers (a
    transformer's layers, not the experts or sub-layers inside one; a CNN's stages), the
    longest among equals. Layers already stored by svdq (`svdq_layer`: a loaded or a
    fine-tuned artifact's) count as targets."""
    best, key = None, (0, 0)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            held = (sum(is_target(m) or getattr(m, "svdq_layer", False) for m in module.modules()),
                    len(module))
            if held[0] and held > key:
                best, key = (name, module), held
    if best is None:
        raise SvdqError(f"{type(model).__name__} has no list of blocks with linear or "
                        "convolution layers; svdq supports GPT-2, Llama-family, BERT-family "
                        "models and ViT, ResNet and ConvNeXt image classifiers")
    return best


def targets(model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the layers to compress, in model order."""
    prefix, _ = blocks_of(model)
    linear = [name for name, m in model.named_modules() if is_target(m)]
    inside = [name for name in linear if name.startswith(prefix + ".")]
    outside = []
    if include:
        outside = [n for n in linear if n not in inside and any(fnmatch(n, p) for p in include)]
        inside = [n for n in inside if any(fnmatch(n, p) for p in include)]
    tied = _tied(model)
    for name in outside:
        if name in tied:
            raise SvdqError(f"--include matches {name}, whose weight is tied to {tied[name]}; "
                            "exclude it and quantize both with --embed-bits 4|8")
    chosen = [n for n in inside + outside if not any(fnmatch(n, p) for p in exclude)]
    if not chosen:
        raise SvdqError(f"no layer of {type(model).__name__} is left to compress; loosen "
                        "--include/--exclude (module names look like "
                        f"{inside[0] if inside else linear[0] if linear else '...'})")
    return chosen


def head_of(model: nn.Module, names: list[str]) -> list[str]:
    """The target layers of `names` outside the blocks: the head's, which run after them
    (`--include` chooses them; `pipeline.walk` checks that none runs before the blocks)."""
    prefix, _ = blocks_of(model)
    return [n for n in names if not n.startswith(prefix + ".")]


def _tied(model: nn.Module) -> dict[str, str]:
    """{module name: the other module name} for layers whose weight is one tensor with
    another module's (a causal LM's head tied to its embeddings)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(name)
    return {n: next(o for o in names if o != n) for names in owners.values() if len(names) > 1
            for n in names}


def fp16_bytes(module: nn.Module) -> int:
    """A target layer's weight and bias in float16: what --ratio is a fraction of."""
    bias = getattr(module, "bias", None)
    return 2 * (weight_of(module).numel() + (0 if bias is None else bias.numel()))
