"""Output errors of a replacement Ŵ, exactly, from the calibration statistics alone.

    e(Ŵ) = ‖X (W − Ŵ)ᵀ‖_F / ‖X Wᵀ + 1 bᵀ‖_F,   ‖X Δᵀ‖²_F = tr(Δ G Δᵀ),  G = XᵀX

and ‖X Wᵀ + 1 bᵀ‖²_F = tr(W G Wᵀ) + 2 bᵀ W Σx + n ‖b‖², so the Gram matrix, the input sum and
the token count give both (DESIGN.md).
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Callable, Iterator

import torch

from svdq.algo.factorize import LayerStats

ROWS = 512  # rows of W per float64 product in the trace forms: bounds their temporaries
_PRODUCTS = contextvars.ContextVar("products", default=torch.float64)


@contextlib.contextmanager
def products_in(dtype: torch.dtype) -> Iterator[None]:
    """Within the body the trace forms and the corrected errors multiply in `dtype` (`--fast`:
    float32, half float64's time; their sums still add up in float64)."""
    token = _PRODUCTS.set(dtype)
    try:
        yield
    finally:
        _PRODUCTS.reset(token)


def _gram(stats: LayerStats) -> torch.Tensor:
    """The Gram in `products_in`'s dtype (`LayerStats.gram_as`)."""
    return stats.gram_as(_PRODUCTS.get())


def trace_form(a: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """tr(A G Aᵀ) in float64 (the products in `gram`'s dtype, summed in float64), ROWS rows of
    A at a time (no full copy of A)."""
    total = torch.zeros((), dtype=torch.float64, device=gram.device)
    for i in range(0, a.shape[0], ROWS):
        rows = a[i: i + ROWS].to(gram.dtype)
        total += torch.sum((rows @ gram) * rows, dtype=torch.float64)
    return total


def once(stats: LayerStats, name: str, of: tuple, make: Callable[[], float]) -> float:
    """`make()`, made once per Gram (`stats.cache`) and per objects `of` (None allowed): kept
    beside weak references to them, so an object freed and another made in its memory never
    reads this one's number."""
    held = stats.cache.setdefault(name, {})
    key = tuple(map(id, of))
    entry = held.get(key)
    if entry is None or any(ref() is not o for ref, o in zip(entry[0], of)):
        refs = tuple((lambda: None) if o is None else weakref.ref(o) for o in of)
        entry = held[key] = (refs, make())
    return entry[1]


def output_norm2(w: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats) -> float:
    """‖X Wᵀ + 1 bᵀ‖²_F from the statistics, made once per weight and bias object (`once`:
    every form of a layer is judged against it; a budget asked for it five times per layer,
    11 s of a SmolLM2 --fast run)."""
    def make() -> float:
        norm2 = trace_form(w, _gram(stats))
        if bias is not None:
            b = bias.double()
            norm2 = norm2 + 2 * b @ (w.double() @ stats.total) + stats.tokens * b @ b
        return float(norm2)
    return once(stats, "output_norm2", (w, bias), make)


def known_output_norm2(w: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats,
                       norm2: float) -> None:
    """`output_norm2` of this weight and bias on `stats` is `norm2` (measured before on the
    same statistics: a budget's pass 1 for its pass 2)."""
    once(stats, "output_norm2", (w, bias), lambda: norm2)


def base_error2(w: torch.Tensor, q, stats: LayerStats, known: float | None = None) -> float:
    """‖X (W − Q)ᵀ‖² of `w` and its quantized base `q` (`quant.Quantized`/`IntQuantized`),
    made once per weight, base and Gram (`once`): a base's plain form and every rank of its
    correction start from it. `known`: the number, found elsewhere for this very `w` and `q`
    (a whitened SVD's `Factors.energy`: `residual.known`), taken instead of a trace form."""
    make = (lambda: max(known, 0.0)) if known is not None else (
        lambda: error_norm2(w - q.dequantize(), stats))
    return once(stats, "base_error2", (w, q), make)


def error_norm2(delta: torch.Tensor, stats: LayerStats) -> float:
    """‖X Δᵀ‖²_F = tr(Δ G Δᵀ)."""
    return float(trace_form(delta, _gram(stats)).clamp_min(0))


def corrected_error2(e: torch.Tensor, e2: float, us: torch.Tensor, vt: torch.Tensor,
                     stats: LayerStats) -> float:
    """‖X (E − U Vᵀ)ᵀ‖²_F for an error E (out, in) whose ‖X Eᵀ‖² is `e2` and a correction of
    rank k given as `us` (out, k) and `vt` (k, in): e2 − 2 tr(U Vᵀ G Eᵀ) + tr(U Vᵀ G V Uᵀ),
    through M = Vᵀ G (k × in), in k in² + k out in operations where the trace form of the
    corrected error takes out in² (a 576 × 1536 layer's rank-8 correction: 1/60 as many)."""
    g = _gram(stats)
    us, vt = us.to(g.device, g.dtype), vt.to(g.device, g.dtype)
    m = vt @ g
    cross = torch.sum(us * (e.to(g.device, g.dtype) @ m.T), dtype=torch.float64)
    square = torch.sum((us @ (m @ vt.T)) * us, dtype=torch.float64)
    return max(float(e2 - 2 * cross + square), 0.0)


def reference(w: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats) -> float:
    """The denominator of the relative error; an all-zero output makes errors absolute."""
    return output_norm2(w, bias, stats) ** 0.5 or 1.0


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, stats: LayerStats, ref: float) -> float:
    """‖X (W − Ŵ)ᵀ‖_F / `ref`."""
    return error_norm2(w - w_hat, stats) ** 0.5 / ref


def source_error(w: torch.Tensor, bias: torch.Tensor | None, w_hat: torch.Tensor,
                 stats: LayerStats) -> float:
    """‖X Ŵᵀ − X₀ Wᵀ‖_F / ‖X₀ Wᵀ + 1 bᵀ‖_F: the stored layer on the inputs it receives (X)
    against the source layer on the source model's own inputs (X₀, `LayerStats.cross` and
    `source_gram`); without those the two streams are one and this is the plain error."""
    if stats.cross is None:
        return relative_error(w, w_hat, stats, reference(w, bias, stats))
    source = LayerStats(stats.source_gram, stats.source_total, stats.tokens)
    a, w64 = w_hat.double(), w.double()
    e2 = (torch.sum((a @ stats.gram) * a) - 2 * torch.sum((a @ stats.cross) * w64)
          + torch.sum((w64 @ stats.source_gram) * w64))
    return float(e2.clamp_min(0)) ** 0.5 / reference(w, bias, source)
