"""The input embedding as a target (`--embed-bits`), and budgets that count the whole
checkpoint (`--budget-scope all`).

For small models the embedding is most of the file (SmolLM2: 21% of the parameters,
Gemma-3-270M: 63%), and a head tied to it shares its weight. With `--embed-bits 4|8` it is
stored on the uniform integer grid, a float16 scale and a zero point per group of
`--block-size` entries of each row (row-blockwise, so a lookup de-quantizes only the rows it
reads), rounded to the nearest grid point: a lookup table has no input statistics for GPTQ to
use. A tied head stays tied: the loaders multiply by the same codes (`runtime.TiedHead`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from svdq import runtime
from svdq.algo import quant
from svdq.config import Settings
from svdq.errors import SvdqError
from svdq.models.layers import ends, targets
from svdq.plan import LayerPlan, stored_bytes

CODEBOOK_BYTES = 4 * (256 + 16)  # bitsandbytes' code values, stored once where plans use them
ROWS_AT_A_TIME = 8192  # a multiple of 8: each chunk's packed codes and zeros end on a byte


def embedding_of(model: nn.Module) -> tuple[str, nn.Embedding]:
    """The model's input embedding and its module name; refuses a model without one."""
    emb, _ = ends(model)
    name = next((n for n, m in model.named_modules() if m is emb), None)
    if not isinstance(emb, nn.Embedding) or name is None:
        raise SvdqError(f"{type(model).__name__} has no token embedding to quantize; drop "
                        "--embed-bits")
    return name, emb


def tied_heads(model: nn.Module, emb: nn.Embedding) -> list[str]:
    """Names of the linear heads that share the embedding's weight (tied word embeddings)."""
    _, head = ends(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m.weight.shape == emb.weight.shape
            and (m.weight is emb.weight or (tied and m is head))]


def planned_names(model: nn.Module, settings: Settings) -> set[str]:
    """The modules `--embed-bits` takes over: the embedding and its tied heads."""
    if not settings.embed_bits:
        return set()
    name, emb = embedding_of(model)
    return {name, *tied_heads(model, emb)}


def quantize_embedding(model: nn.Module, settings: Settings,
                       stored_dtype: torch.dtype | None = None
                       ) -> tuple[LayerPlan, dict[str, torch.Tensor]]:
    """The embedding at `settings.embed_bits` on the integer grid: its plan entry (kind dense,
    `lookup` naming the tied heads; error = relative Frobenius error of the table) and its
    artifact tensors."""
    name, emb = embedding_of(model)
    heads = tied_heads(model, emb)
    w = emb.weight.detach()
    rows, cols = w.shape
    bits, group = settings.embed_bits, settings.block_size
    parts, err, energy = [], 0.0, 0.0
    for r in range(0, rows, ROWS_AT_A_TIME):
        chunk = w[r:r + ROWS_AT_A_TIME].float()
        q = quant.quantize(chunk, bits, group, grid="int")
        err += (q.dequantize().to(chunk.device) - chunk).pow(2).sum().item()
        energy += chunk.pow(2).sum().item()
        parts.append(q)
    stored = quant.IntQuantized(torch.cat([q.codes for q in parts]),
                                torch.cat([q.scales for q in parts]),
                                torch.cat([q.zeros for q in parts]), (rows, cols), bits, group)
    keys = runtime.keys(name)
    tensors = {**stored.tensors(keys["weight"]), keys["plain"]: runtime.marker()}
    plan = LayerPlan(name, type(emb).__name__, rows, cols, False, "dense", 0, 0, bits, group,
                     stored_bytes(tensors, w.dtype, stored_dtype), 2 * rows * cols,
                     math.sqrt(err / max(energy, 1e-30)), grid="int", lookup=heads)
    return plan, tensors


def fixed_bytes(model: nn.Module, settings: Settings, stored_dtype: torch.dtype | None) -> int:
    """Bytes the artifact spends outside the target layers: every other tensor of the model
    once (tied ones once) in the dtype it is stored in, the embedding at `--embed-bits` where
    it is quantized. Shapes only: works on a streamed source's empty skeleton."""
    owners = set(targets(model, settings.include, settings.exclude))
    taken = planned_names(model, settings)
    total, seen = 0, set()
    for key, t in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if owner in owners or owner in taken or id(t) in seen:
            continue
        seen.add(id(t))
        size = (stored_dtype or t.dtype).itemsize if t.is_floating_point() else t.element_size()
        total += t.numel() * size
    if taken:
        _, emb = embedding_of(model)
        rows, cols = emb.weight.shape
        total += sum(runtime.int_bytes(rows, cols, settings.embed_bits, settings.block_size))
    return total + CODEBOOK_BYTES


def layers_budget(model: nn.Module, settings: Settings, stored_dtype: torch.dtype | None) -> int:
    """`--budget-scope all`: the bytes left to the target layers once everything else is
    counted; refuses a budget the rest alone exceeds."""
    params = sum(p.numel() for p in model.parameters())  # as the manifest's checkpoint_fp16_bytes
    whole = (math.floor(settings.budget_ratio * 2 * params) if settings.budget_ratio is not None
             else settings.budget_bytes)
    rest = fixed_bytes(model, settings, stored_dtype)
    if rest >= whole:
        hint = "" if settings.embed_bits else " or quantize the embedding (--embed-bits 8)"
        raise SvdqError(f"the tensors outside the target layers alone take {rest:,} bytes of the "
                        f"{whole:,} the whole checkpoint may use; raise --ratio/--size{hint}")
    return whole - rest
