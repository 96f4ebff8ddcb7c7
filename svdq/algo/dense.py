"""The dense form: the whole weight quantized at `bits` (or kept: see `stored.keep`).

A weight is quantized on a grid (`quant`: bitsandbytes NF4/8-bit blocks, or the uniform
integer grid's groups) either by rounding each entry to the nearest grid point or, with
`gptq`, by GPTQ against the layer's input Gram (`algo.gptq`): every dense weight, residual
base and refined base goes through `quantize_weight`.
"""
from __future__ import annotations

import torch

from svdq.algo.error import relative_error
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
        held = stats.cache.get("quantized")
        if held is not None and held[0] is w and (bits, block_size, grid) in held[1]:
            return held[1][(bits, block_size, grid)]
        return _gptq([w], stats, [(bits, block_size, grid)])[0]
    energy = stats.gram.diagonal() if grid == "int" else None
    return quantize(w, bits, block_size, grid, energy)


def prequantize(w: torch.Tensor, stats: LayerStats, grids: list[tuple[int, int, str]],
                gptq: bool) -> None:
    """With `gptq`, quantize `w` on all of `grids` ((bits, block size, grid)) at once
    (`quantize_each`) and keep them in `stats.cache` for `quantize_weight`, replacing what it
    held before."""
    grids = [g for g in dict.fromkeys(grids) if g[0] != 16]
    if gptq and grids:
        stats.cache["quantized"] = (w, dict(zip(grids, quantize_each([w] * len(grids), stats,
                                                                    grids, gptq))))


STACK = 1 << 24  # weights side by side in one GPTQ loop (64 MB a float32 copy)


def quantize_each(ws: list[torch.Tensor], stats: LayerStats, grids: list[tuple[int, int, str]],
                  gptq: bool) -> list[Quantized | IntQuantized]:
    """`quantize_weight` of each of `ws` (one shape, one layer's inputs) on its grid of
    `grids`: by GPTQ in one column loop (`gptq.gptq_many`: the same codes as one at a time)
    for as many as stay under `STACK` weights together, which bounds its memory."""
    if not gptq or any(g[0] == 16 for g in grids):
        return [quantize_weight(w, stats, *g, gptq) for w, g in zip(ws, grids)]
    per = max(1, STACK // ws[0].numel())
    return [q for i in range(0, len(ws), per)
            for q in _gptq(ws[i:i + per], stats, grids[i:i + per])]


def _gptq(ws: list[torch.Tensor], stats: LayerStats, grids: list[tuple[int, int, str]]) -> list:
    if "gptq" not in stats.cache:  # the same for every grid the layer is tried on
        stats.cache["gptq"] = prepare(stats.gram.to(ws[0].device))
    # shrinking a group's range pays below 4 bits (layer losses 12% lower at 3 bits on
    # SmolLM2's first blocks) and not above (as often worse as better at 4 bits)
    return gptq_many(ws, stats.gram, [(b, k, g, b < 4) for b, k, g in grids],
                     prepared=stats.cache["gptq"])


def stored_dense(w: torch.Tensor, stats: LayerStats, ref: float, bits: int, block_size: int,
                 k_break: int, grid: str = "bnb", gptq: bool = False) -> Stored:
    """The whole weight quantized at `bits`, and its error relative to `ref`."""
    q = quantize_weight(w, stats, bits, block_size, grid, gptq)
    return Stored("dense", 0, k_break, bits, relative_error(w, q.dequantize(), stats, ref), weight=q)
