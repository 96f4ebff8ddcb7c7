"""Per-layer choice: the smallest rank whose stored layer meets eps, else a dense fallback.

Output error of a replacement Ŵ on calibration inputs X (DESIGN.md):

    e(Ŵ) = ‖X (W − Ŵ)ᵀ‖_F / ‖X Wᵀ + 1 bᵀ‖_F,   ‖X Δᵀ‖²_F = tr(Δ G Δᵀ),  G = XᵀX

and ‖X Wᵀ + 1 bᵀ‖²_F = tr(W G Wᵀ) + 2 bᵀ W Σx + n ‖b‖², so the Gram matrix, the input sum and
the token count give both exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from svdq.algo.factorize import Factors, LayerStats, factorize
from svdq.algo.quant import Quantized, nbytes, quantize


ROWS = 512  # rows of W per float64 product in the trace forms: bounds their temporaries


def _trace_form(a: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """tr(A G Aᵀ) in float64, ROWS rows of A at a time (no full float64 copy of A)."""
    total = torch.zeros((), dtype=torch.float64, device=gram.device)
    for i in range(0, a.shape[0], ROWS):
        rows = a[i: i + ROWS].double()
        total += torch.sum((rows @ gram) * rows)
    return total


def output_norm2(w: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats) -> float:
    """‖X Wᵀ + 1 bᵀ‖²_F from the statistics."""
    norm2 = _trace_form(w, stats.gram)
    if bias is not None:
        b = bias.double()
        norm2 = norm2 + 2 * b @ (w.double() @ stats.total) + stats.tokens * b @ b
    return float(norm2)


def error_norm2(delta: torch.Tensor, stats: LayerStats) -> float:
    """‖X Δᵀ‖²_F = tr(Δ G Δᵀ)."""
    return float(_trace_form(delta, stats.gram).clamp_min(0))


def lowrank_bytes(out_f: int, in_f: int, rank: int, bits: int, block_size: int) -> int:
    """Stored bytes of a rank-`rank` layer: Uᵀ and Vᵀ at `bits`, Σ in float32 (bias apart)."""
    return nbytes(rank * out_f, bits, block_size) + nbytes(rank * in_f, bits, block_size) + 4 * rank


def _largest_rank(max_rank: int, size: Callable[[int], int], limit: int) -> int:
    """The largest rank in 0..max_rank whose `size(rank)` is below `limit` (sizes grow with
    the rank: bisect on the predicate)."""
    lo, hi = 0, max_rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(mid) < limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def break_even_rank(out_f: int, in_f: int, bits: int, block_size: int) -> int:
    """The largest rank whose stored bytes are below the dense layer's at the same bits (0 if none)."""
    return _largest_rank(min(out_f, in_f),
                         lambda k: lowrank_bytes(out_f, in_f, k, bits, block_size),
                         nbytes(out_f * in_f, bits, block_size))


@dataclass
class Choice:
    """What a layer becomes. kind 'lowrank' uses u/s/v; 'dense' uses weight (None: keep as is);
    'residual' uses both: the weight quantized at `bits` plus a rank-`rank` correction whose
    factors are stored at `RESIDUAL_FACTOR_BITS`."""

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


RESIDUAL_FACTOR_BITS = 8  # the correction is small: its factors take 8 bits at any --bits


def residual_bytes(out_f: int, in_f: int, rank: int, bits: int, block_size: int) -> int:
    """Stored bytes of the weight at `bits` plus a rank-`rank` correction (bias apart)."""
    correction = lowrank_bytes(out_f, in_f, rank, RESIDUAL_FACTOR_BITS, block_size) if rank else 0
    return nbytes(out_f * in_f, bits, block_size) + correction


@dataclass
class Residual:
    """The weight quantized at `bits`, and the factors of what that quantization lost
    (W − Q(W)), from which every rank of correction is a slice."""

    weight: Quantized
    factors: Factors


def residual_of(w: torch.Tensor, stats: LayerStats, bits: int, block_size: int,
                method: str) -> Residual:
    """Quantize `w`, then factorize its quantization error with `method` (`--method`)."""
    q = quantize(w, bits, block_size)
    return Residual(q, factorize(method, w - q.dequantize(), stats))


def stored_residual(w: torch.Tensor, res: Residual, stats: LayerStats, ref: float, k: int,
                    k_break: int) -> Choice:
    """The quantized weight plus the rank-`k` correction as stored, and its error.

    Rank 0 is the quantized weight alone, stored as a plain dense layer."""
    q, bits, block_size = res.weight, res.weight.bits, res.weight.block_size
    w_hat = q.dequantize()
    if k == 0:
        err = error_norm2(w - w_hat, stats) ** 0.5 / ref
        return Choice("dense", 0, k_break, bits, err, weight=q)
    u = quantize(res.factors.u[:, :k].T, RESIDUAL_FACTOR_BITS, block_size)
    v = quantize(res.factors.vt[:k], RESIDUAL_FACTOR_BITS, block_size)
    s = res.factors.s[:k].float().contiguous()
    w_hat = w_hat + (u.dequantize().T * s) @ v.dequantize()
    err = error_norm2(w - w_hat, stats) ** 0.5 / ref
    return Choice("residual", k, k_break, bits, err, u=u, s=s, v=v, weight=q)


def refine_residual(w: torch.Tensor, choice: Choice, stats: LayerStats, ref: float,
                    method: str, rounds: int = 2) -> Choice:
    """Alternate (as LoftQ does) on a residual layer of rank k: quantize W minus the current
    correction, refit the rank-k correction to what that quantization lost, keep the result
    while the stored error falls. Same bytes; measured 4–11% lower error on SmolLM2's
    block-3 layers (benchmarks/refine_residual.py)."""
    if choice.kind != "residual":
        return choice
    best = choice
    for _ in range(rounds):
        correction = (best.u.dequantize().T * best.s) @ best.v.dequantize()
        q = quantize(w - correction, best.weight.bits, best.weight.block_size)
        res = Residual(q, factorize(method, w - q.dequantize(), stats))
        trial = stored_residual(w, res, stats, ref, best.rank, best.k_break)
        if trial.error >= best.error:
            break
        best = trial
    return best


def residual_break_rank(out_f: int, in_f: int, bits: int, block_size: int) -> int:
    """The largest correction rank that keeps the layer below the next precision stored dense
    (8 bits above 4, float16 above 8): beyond it, more bits for the weight are cheaper."""
    above = 8 if bits == 4 else 16
    return _largest_rank(min(out_f, in_f),
                         lambda k: residual_bytes(out_f, in_f, k, bits, block_size),
                         nbytes(out_f * in_f, above, block_size))


def choose_residual(w: torch.Tensor, bias: torch.Tensor | None, res: Residual, stats: LayerStats,
                    eps: float, method: str | None = None) -> Choice:
    """The smallest correction rank (0 = the quantized weight alone) whose stored layer has
    error ≤ eps, up to `residual_break_rank`; the layer is kept as is if even that fails.
    With `method` (the factorization of `res`) the answer is then `refine_residual`d."""
    out_f, in_f = w.shape
    bits, block_size = res.weight.bits, res.weight.block_size
    ref = reference(w, bias, stats)
    k_break = min(residual_break_rank(out_f, in_f, bits, block_size), res.factors.max_rank)
    tried: dict[int, Choice] = {}

    def trial(k: int) -> Choice:
        if k not in tried:
            tried[k] = stored_residual(w, res, stats, ref, k, k_break)
        return tried[k]

    if trial(0).error <= eps:
        return trial(0)
    if k_break == 0 or trial(k_break).error > eps:
        return Choice("dense", 0, k_break, None, 0.0)
    best = _smallest_rank(k_break, trial, eps)
    return refine_residual(w, best, stats, ref, method) if method else best


def reference(w: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats) -> float:
    """The denominator of the relative error; an all-zero output makes errors absolute."""
    return output_norm2(w, bias, stats) ** 0.5 or 1.0


def _smallest_rank(k_break: int, trial: Callable[[int], Choice], eps: float) -> Choice:
    """Bisect 1..k_break for the smallest rank whose `trial` meets eps, given that k_break
    does (the error falls with the rank up to quantization noise)."""
    lo, hi, best = 0, k_break, trial(k_break)  # invariant: rank lo fails, rank hi = best passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if trial(mid).error <= eps:
            hi, best = mid, trial(mid)
        else:
            lo = mid
    return best


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

    if k_break > 0 and lowrank(k_break).error <= eps:
        return _smallest_rank(k_break, lowrank, eps)
    key = ("dense", bits, 0)
    if key not in cache:
        cache[key] = stored_dense(w, stats, ref, bits, block_size, k_break)
    if cache[key].error <= eps:
        return cache[key]
    return Choice("dense", 0, k_break, None, 0.0)


def source_error(w: torch.Tensor, bias: torch.Tensor | None, w_hat: torch.Tensor,
                 stats: LayerStats) -> float:
    """‖X Ŵᵀ − X₀ Wᵀ‖_F / ‖X₀ Wᵀ + 1 bᵀ‖_F: the stored layer on the inputs it receives (X)
    against the source layer on the source model's own inputs (X₀, `LayerStats.cross` and
    `source_gram`); without those the two streams are one and this is the plain error."""
    if stats.cross is None:
        return error_norm2(w - w_hat, stats) ** 0.5 / reference(w, bias, stats)
    source = LayerStats(stats.source_gram, stats.source_total, stats.tokens)
    a, w64 = w_hat.double(), w.double()
    e2 = (torch.sum((a @ stats.gram) * a) - 2 * torch.sum((a @ stats.cross) * w64)
          + torch.sum((w64 @ stats.source_gram) * w64))
    return float(e2.clamp_min(0)) ** 0.5 / reference(w, bias, source)


def refit_u(w: torch.Tensor, bias: torch.Tensor | None, choice: Choice,
            stats: LayerStats) -> tuple[Choice, float, float]:
    """Refit a low-rank or corrected layer's U in closed form, V and the dense part fixed.

    With D the stored dense part (0 for low rank) and V̂ the stored Vᵀ, the least-squares
    M = U Σ for the source layer's outputs, ‖X (D + M V̂)ᵀ − X₀ Wᵀ‖_F, is
    Mᵀ = (V̂ G V̂ᵀ)⁻¹ V̂ (C Wᵀ − G Dᵀ) with G = XᵀX and C = Xᵀ X₀ (`LayerStats.cross`; G without
    a source stream, where the refit still undoes what quantizing V̂ cost). Σ becomes the row
    norms of Mᵀ, U its normalized rows, quantized as before. Kept only if the error against
    the source (`source_error`) falls. Returns (choice, source error before, after)."""
    if choice.kind not in ("lowrank", "residual"):
        w_hat = choice.weight.dequantize() if choice.weight is not None else w
        e = source_error(w, bias, w_hat, stats)
        return choice, e, e
    vt = choice.v.dequantize().double()  # (k, in)
    d = (choice.weight.dequantize().double() if choice.kind == "residual"
         else torch.zeros_like(w, dtype=torch.float64))
    w64, gram = w.double(), stats.gram
    cross = gram if stats.cross is None else stats.cross
    p = vt @ gram @ vt.T
    r = vt @ (cross @ w64.T - gram @ d.T)  # (k, out)
    damp = 1e-9 * float(torch.trace(p)) / p.shape[0] + 1e-30
    mt = torch.linalg.solve(p + damp * torch.eye(p.shape[0], dtype=p.dtype, device=p.device), r)
    s = mt.norm(dim=1)
    ut = mt / s.clamp_min(1e-30)[:, None]
    u = quantize(ut.float(), choice.u.bits, choice.u.block_size)
    s = s.float().contiguous()

    def stored(u_q: Quantized, s_: torch.Tensor) -> torch.Tensor:
        return d.float() + (u_q.dequantize().T * s_) @ vt.float()

    before = source_error(w, bias, stored(choice.u, choice.s), stats)
    w_hat = stored(u, s)
    after = source_error(w, bias, w_hat, stats)
    if not after < before:
        return choice, before, before
    err = error_norm2(w - w_hat, stats) ** 0.5 / reference(w, bias, stats)
    return replace(choice, u=u, s=s, error=err), before, after
