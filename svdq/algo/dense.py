"""The dense form: the whole weight quantized at `bits` (or kept: see `stored.keep`)."""
from __future__ import annotations

import torch

from svdq.algo.error import relative_error
from svdq.algo.factorize import LayerStats
from svdq.algo.quant import quantize
from svdq.algo.stored import Stored


def stored_dense(w: torch.Tensor, stats: LayerStats, ref: float, bits: int, block_size: int,
                 k_break: int) -> Stored:
    """The whole weight quantized at `bits`, and its error relative to `ref`."""
    q = quantize(w, bits, block_size)
    return Stored("dense", 0, k_break, bits, relative_error(w, q.dequantize(), stats, ref), weight=q)
