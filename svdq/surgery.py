"""Which layers are compressed, and swapping modules by name.

Targets are the linear layers (`nn.Linear`, GPT-2 `Conv1D`) inside the transformer blocks;
embeddings, `lm_head` and poolers lie outside the blocks and stay as they are. `include`
narrows the targets and `exclude` removes some, both with fnmatch patterns on module names.
"""
from __future__ import annotations

from fnmatch import fnmatch

from torch import nn

from svdq.errors import SvdqError
from svdq.hf import blocks_of, is_linear
from svdq.runtime import set_module

__all__ = ["targets", "set_module"]


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
