"""The low-rank form: W ≈ U Σ Vᵀ at rank k, Uᵀ and Vᵀ quantized at `bits`, Σ in float32."""
from __future__ import annotations

import torch

from svdq.algo.error import relative_error
from svdq.algo.factorize import Factors, LayerStats
from svdq.algo.quant import nbytes, quantize
from svdq.algo.stored import Stored, largest_rank


def lowrank_bytes(out_f: int, in_f: int, rank: int, bits: int, block_size: int) -> int:
    """Stored bytes of a rank-`rank` layer: Uᵀ and Vᵀ at `bits`, Σ in float32 (bias apart)."""
    return nbytes(rank * out_f, bits, block_size) + nbytes(rank * in_f, bits, block_size) + 4 * rank


def break_even_rank(out_f: int, in_f: int, bits: int, block_size: int) -> int:
    """The largest rank whose stored bytes are below the dense layer's at the same bits (0 if none)."""
    return largest_rank(min(out_f, in_f),
                        lambda k: lowrank_bytes(out_f, in_f, k, bits, block_size),
                        nbytes(out_f * in_f, bits, block_size))


def k_break_of(w: torch.Tensor, factors: Factors, bits: int, block_size: int) -> int:
    """The break-even rank, at most what the factors hold."""
    return min(break_even_rank(*w.shape, bits, block_size), factors.max_rank)


def stored_lowrank(w: torch.Tensor, factors: Factors, stats: LayerStats, ref: float, k: int,
                   bits: int, block_size: int, k_break: int) -> Stored:
    """The layer stored at rank `k` (Uᵀ, Vᵀ quantized at `bits`, Σ float32) and its error.

    `ref` is ‖X Wᵀ + 1 bᵀ‖_F (`error.reference`): errors are relative to it.
    """
    u, v = quantize(factors.u[:, :k].T, bits, block_size), quantize(factors.vt[:k], bits, block_size)
    s = factors.s[:k].float().contiguous()
    w_hat = (u.dequantize().T * s) @ v.dequantize()
    return Stored("lowrank", k, k_break, bits, relative_error(w, w_hat, stats, ref), u=u, s=s, v=v)
