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


def stored_lowrank(w: torch.Tensor, factors: Factors, stats: LayerStats, ref: float, k: int,
                   bits: int, block_size: int, k_break: int) -> Choice:
    """The layer stored at rank `k` (Uᵀ, Vᵀ quantized at `bits`, Σ float32) and its error.

    `ref` is ‖X Wᵀ + 1 bᵀ‖_F (`reference`): errors are relative to it.
    """
    u, v = quantize(factors.u[:, :k].T, bits, block_size), quantize(factors.vt[:k], bits, block_size)
    s = factors.s[:k].float().contiguous()
    w_hat = (u.dequantize().T * s) @ v.dequantize()
    err = error_norm2(w - w_hat, stats) ** 0.5 / ref
    return Choice("lowrank", k, k_break, bits, err, u=u, s=s, v=v)


def stored_dense(w: torch.Tensor, stats: LayerStats, ref: float, bits: int, block_size: int,
                 k_break: int) -> Choice:
    """The whole weight quantized at `bits`, and its error relative to `ref`."""
    q = quantize(w, bits, block_size)
    err = error_norm2(w - q.dequantize(), stats) ** 0.5 / ref
    return Choice("dense", 0, k_break, bits, err, weight=q)


def reference(w: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats) -> float:
    """The denominator of the relative error; an all-zero output makes errors absolute."""
    return output_norm2(w, bias, stats) ** 0.5 or 1.0


def choose(w: torch.Tensor, bias: torch.Tensor | None, factors: Factors, stats: LayerStats,
           eps: float, bits: int, block_size: int, cache: dict | None = None) -> Choice:
    """Binary-search the smallest rank in 1..k_break whose stored layer has error ≤ eps.

    Assumes the error falls with the rank (it does up to quantization noise); the answer k
    always meets eps and, when k > 1, rank k − 1 was measured not to. `cache` (one per layer,
    optional) keeps the stored layers tried, keyed (kind, bits, rank), for later calls.
    """
    out_f, in_f = w.shape
    ref = reference(w, bias, stats)
    k_break = min(break_even_rank(out_f, in_f, bits, block_size), factors.max_rank)
    cache = {} if cache is None else cache

    def lowrank(k: int) -> Choice:
        key = ("lowrank", bits, k)
        if key not in cache:
            cache[key] = stored_lowrank(w, factors, stats, ref, k, bits, block_size, k_break)
        return cache[key]

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
    key = ("dense", bits, 0)
    if key not in cache:
        cache[key] = stored_dense(w, stats, ref, bits, block_size, k_break)
    if cache[key].error <= eps:
        return cache[key]
    return Choice("dense", 0, k_break, None, 0.0)
