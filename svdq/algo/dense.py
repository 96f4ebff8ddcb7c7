"""The dense form: the whole weight quantized at `bits` (or kept: see `stored.keep`).

A weight is quantized on a grid (`quant`: bitsandbytes NF4/8-bit blocks, or the uniform
integer grid's groups) either by rounding each entry to the nearest grid point or, with
`gptq`, by GPTQ against the layer's input Gram (`algo.gptq`): every dense weight, residual
base and refined base goes through `quantize_weight`.
"""
from __future__ import annotations

import torch

from svdq.algo.error import base_error2
from svdq.algo.factorize import LayerStats
from svdq.algo.gptq import gptq_many, prepare
from svdq.algo.quant import IntQuantized, Quantized, quantize
from svdq.algo.stored import Stored


def quantize_weight(w: torch.Tensor, stats: LayerStats, bits: int, block_size: int,
                    grid: str = "bnb", gptq: bool = False) -> Quantized | IntQuantized:
    """`w` (out, in) on `grid` at `bits`: by GPTQ against `stats.gram`, or by rounding (the
    integer grid's scales then weigh columns by their input energy). What `prequantize` made
    of this very `w` is handed out, not made again."""
    if gptq and bits != 16:
        kept = held(w, stats)
        if kept is not None and (bits, block_size, grid) in kept:
            return kept[(bits, block_size, grid)]
        return _gptq([w], stats, [(bits, block_size, grid)])[0]
    energy = stats.gram.diagonal() if grid == "int" else None
    return quantize(w, bits, block_size, grid, energy)


def prequantize(ws: torch.Tensor | list[torch.Tensor], stats: LayerStats,
                grids: list[tuple[int, int, str]], gptq: bool) -> None:
    """With `gptq`, quantize each of `ws` (one layer's weight, or the weights of the layers
    fed the same inputs: q, k and v; gate and up) on all of `grids` ((bits, block size,
    grid)) at once (`quantize_each`: GPTQ's rows are independent under one inverse Hessian,
    so layers sharing it share the column loop, whose cost is mostly per column) and keep
    them in `stats.cache` for `quantize_weight` of those very tensors until `release`."""
    ws = [ws] if isinstance(ws, torch.Tensor) else list(ws)
    grids = [g for g in dict.fromkeys(grids) if g[0] != 16]
    if gptq and grids:
        done = quantize_each([w for w in ws for _ in grids], stats, grids * len(ws), gptq)
        for i, w in enumerate(ws):
            hold(w, stats, dict(zip(grids, done[i * len(grids):(i + 1) * len(grids)])))


def hold(w: torch.Tensor, stats: LayerStats, quantized: dict) -> None:
    """Keep `quantized` ({(bits, block, grid): weight}, made of `w`) for `quantize_weight`."""
    stats.cache.setdefault("quantized", {})[id(w)] = (w, quantized)


def release(w: torch.Tensor, stats: LayerStats) -> dict | None:
    """What `prequantize` or `hold` kept of `w`, no longer kept (None: nothing)."""
    kept = held(w, stats)
    if kept is not None:
        del stats.cache["quantized"][id(w)]
    return kept


def held(w: torch.Tensor, stats: LayerStats) -> dict | None:
    """What is kept of `w` ({(bits, block, grid): weight}), or None."""
    entry = stats.cache.get("quantized", {}).get(id(w))
    return entry[1] if entry is not None and entry[0] is w else None


STACK = 1 << 24  # weights side by side in one GPTQ loop (64 MB a float32 copy)


def quantize_each(ws: list[torch.Tensor], stats: LayerStats, grids: list[tuple[int, int, str]],
                  gptq: bool) -> list[Quantized | IntQuantized]:
    """`quantize_weight` of each of `ws` (one input width: one layer's inputs) on its grid of
    `grids`: by GPTQ in one column loop (`gptq.gptq_many`: the same codes as one at a time)
    for as many in a row as stay under `STACK` weights together, which bounds its memory."""
    if not gptq or any(g[0] == 16 for g in grids):
        return [quantize_weight(w, stats, *g, gptq) for w, g in zip(ws, grids)]
    out, start, size = [], 0, 0
    for i, w in enumerate(ws):
        if i > start and size + w.numel() > STACK:
            out += _gptq(ws[start:i], stats, grids[start:i])
            start, size = i, 0
        size += w.numel()
    return out + _gptq(ws[start:], stats, grids[start:])


def _gptq(ws: list[torch.Tensor], stats: LayerStats, grids: list[tuple[int, int, str]]) -> list:
    if "gptq" not in stats.cache:  # the same for every grid the layer is tried on
        stats.cache["gptq"] = prepare(stats.gram.to(ws[0].device))
    # shrinking a group's range pays below 4 bits (layer losses 12% lower at 3 bits on
    # SmolLM2's first blocks) and not above (as often worse as better at 4 bits)
    return gptq_many(ws, stats.gram, [(b, k, g, b < 4) for b, k, g in grids],
                     prepared=stats.cache["gptq"])


def stored_dense(w: torch.Tensor, stats: LayerStats, ref: float, bits: int, block_size: int,
                 k_break: int, grid: str = "bnb", gptq: bool = False) -> Stored:
    """The whole weight quantized at `bits`, and its error relative to `ref` (`base_error2`:
    what `stored_residual` reads too)."""
    q = quantize_weight(w, stats, bits, block_size, grid, gptq)
    return Stored("dense", 0, k_break, bits, base_error2(w, q, stats) ** 0.5 / ref, weight=q)
