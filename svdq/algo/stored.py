"""A layer's stored form with its tensors: what the rank search, the budget and the refit
hand around, and what `svdq.plan` turns into a manifest entry and artifact tensors.

| kind     | tensors                                   | computes                       |
|----------|-------------------------------------------|--------------------------------|
| keep     | none (the source layer's own)             | the source layer               |
| dense    | `weight` at `bits`                        | Q(W)                           |
| lowrank  | `u` (Uᵀ), `s` (Σ, float32), `v` (Vᵀ)      | U Σ Vᵀ                         |
| residual | `weight` at `bits`, `u`, `s`, `v`         | Q(W) + U Σ Vᵀ (a correction)   |
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from svdq.algo.quant import Quantized

KINDS = ("keep", "dense", "lowrank", "residual")


@dataclass(frozen=True)
class Stored:
    """A layer as it will be stored, and its relative output error on the calibration inputs.
    `bits` is the weight's (dense, residual) or the factors' (lowrank); `k_break` is the rank
    above which the form stops saving bytes (recorded for `svdq inspect`)."""

    kind: str
    rank: int
    k_break: int
    bits: int | None  # None: kept in the source precision
    error: float
    u: Quantized | None = None
    s: torch.Tensor | None = None
    v: Quantized | None = None
    weight: Quantized | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown stored kind {self.kind!r}")

    @property
    def block_size(self) -> int | None:
        """The quantization block of the stored tensors (a budget may pick another than
        --block-size), or None for a kept layer."""
        stored = self.weight or self.u
        return None if stored is None else stored.block_size

    def dequantize(self) -> torch.Tensor | None:
        """Ŵ as the loaders compute it (float32), or None for a kept layer."""
        w_hat = None if self.weight is None else self.weight.dequantize()
        if self.u is not None:
            low = (self.u.dequantize().T * self.s) @ self.v.dequantize()
            w_hat = low if w_hat is None else w_hat + low
        return w_hat


def keep(k_break: int = 0) -> Stored:
    """The layer kept as it is (no error)."""
    return Stored("keep", 0, k_break, None, 0.0)


def largest_rank(max_rank: int, size, limit: int) -> int:
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
