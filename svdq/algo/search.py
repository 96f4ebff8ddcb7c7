"""Per-layer choice: the smallest rank whose stored layer meets eps, else a dense fallback.

Output error of a replacement Ŵ on calibration inputs X (DESIGN.md):

    e(Ŵ) = ‖X (W − Ŵ)ᵀ‖_F / ‖X Wᵀ + 1 bᵀ‖_F,   ‖X Δᵀ‖²_F = tr(Δ G Δᵀ),  G = XᵀX

and ‖X Wᵀ + 1 bᵀ‖²_F = tr(W G Wᵀ) + 2 bᵀ W Σx + n ‖b‖², so the Gram matrix, the input sum and
the token count give both exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from svdq.algo.factorize import Factors, LayerStats
from svdq.algo.quant import Quantized, nbytes, quantize


def output_norm2(w: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats) -> float:
    """‖X Wᵀ + 1 bᵀ‖²_F from the statistics."""
    w64 = w.double()
    norm2 = torch.sum((w64 @ stats.gram) * w64)
    if bias is not None:
        b = bias.double()
        norm2 = norm2 + 2 * b @ (w64 @ stats.total) + stats.tokens * b @ b
    return float(norm2)


def error_norm2(delta: torch.Tensor, stats: LayerStats) -> float:
    """‖X Δᵀ‖²_F = tr(Δ G Δᵀ)."""
    d = delta.double()
    return float(torch.sum((d @ stats.gram) * d).clamp_min(0))


def lowrank_bytes(out_f: int, in_f: int, rank: int, bits: int, block_size: int) -> int:
    """Stored bytes of a rank-`rank` layer: Uᵀ and Vᵀ at `bits`, Σ in float32 (bias apart)."""
    return nbytes(rank * out_f, bits, block_size) + nbytes(rank * in_f, bits, block_size) + 4 * rank


def break_even_rank(out_f: int, in_f: int, bits: int, block_size: int) -> int:
    """The largest rank whose stored bytes are below the dense layer's at the same bits (0 if none)."""
    dense = nbytes(out_f * in_f, bits, block_size)
    lo, hi = 0, min(out_f, in_f)  # bytes grow with rank: bisect on the predicate
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if lowrank_bytes(out_f, in_f, mid, bits, block_size) < dense:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class Choice:
    """What a layer becomes. kind 'lowrank' uses u/s/v; 'dense' uses weight (None: keep as is)."""

    kind: str
    rank: int
    k_break: int
    bits: int | None  # None: dense in the source precision
    error: float
    u: Quantized | None = None
    s: torch.Tensor | None = None
    v: Quantized | None = None
    weight: Quantized | None = None


def choose(w: torch.Tensor, bias: torch.Tensor | None, factors: Factors, stats: LayerStats,
           eps: float, bits: int, block_size: int) -> Choice:
    """Binary-search the smallest rank in 1..k_break whose stored layer has error ≤ eps.

    Assumes the error falls with the rank (it does up to quantization noise); the answer k
    always meets eps and, when k > 1, rank k − 1 was measured not to.
    """
    out_f, in_f = w.shape
    ref = output_norm2(w, bias, stats) ** 0.5 or 1.0  # an all-zero output: errors are absolute
    k_break = min(break_even_rank(out_f, in_f, bits, block_size), factors.max_rank)

    def lowrank(k: int) -> Choice:
        u, v = quantize(factors.u[:, :k].T, bits, block_size), quantize(factors.vt[:k], bits, block_size)
        s = factors.s[:k].float().contiguous()
        w_hat = (u.dequantize().T * s) @ v.dequantize()
        err = error_norm2(w - w_hat, stats) ** 0.5 / ref
        return Choice("lowrank", k, k_break, bits, err, u=u, s=s, v=v)

    best = lowrank(k_break) if k_break > 0 else None
    if best is not None and best.error <= eps:
        lo, hi = 0, k_break  # invariant: rank lo fails (0 = nothing), rank hi = best passes
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = lowrank(mid)
            if trial.error <= eps:
                hi, best = mid, trial
            else:
                lo = mid
        return best
    q = quantize(w, bits, block_size)
    err = error_norm2(w - q.dequantize(), stats) ** 0.5 / ref
    if err <= eps:
        return Choice("dense", 0, k_break, bits, err, weight=q)
    return Choice("dense", 0, k_break, None, 0.0)
