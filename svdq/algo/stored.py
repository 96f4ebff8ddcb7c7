"""A layer's stored form with its tensors: what the rank search, the budget and the refit
hand around, and what `svdq.plan` turns into a manifest entry and artifact tensors.

| kind     | tensors                                   | computes                       |
|----------|-------------------------------------------|--------------------------------|
| keep     | none (the source layer's own)             | the source layer               |
| dense    | `weight` at `bits`                        | Q(W)                           |
| lowrank  | `u` (Uᵀ), `s` (Σ, float32), `v` (Vᵀ)      | U Σ Vᵀ                         |
| residual | `weight` at `bits`, `u`, `s`, `v`         | Q(W) + U Σ Vᵀ (a correction)   |

Any form but keep (and a 16-bit dense weight) may carry a sparse term `sparse` (`algo.sparse.
CSR`: a few entries kept exactly, added to what the form computes: `--sparse`).

A dense form may store only some output rows (`rows`: [start, length] runs of the `outputs`
rows; the others are zero before the bias) and bring a bias of its own (`bias`): the
attention product's narrower queries and keys (`algo.product`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from svdq.algo.quant import Quantized
from svdq.runtime import runs_index

if TYPE_CHECKING:  # for the annotation only
    from svdq.algo.sparse import CSR

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
    sparse: "CSR | None" = None  # algo.sparse.CSR: entries kept exactly, added
    rows: list | None = None  # dense only: the output rows `weight` holds, [start, length] runs
    outputs: int = 0  # with `rows`: the layer's output rows
    bias: torch.Tensor | None = None  # a bias replacing the source layer's (with `rows`)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown stored kind {self.kind!r}")
        if self.rows is not None and (self.kind != "dense" or not self.outputs):
            raise ValueError("only a dense form stores some rows, and it needs `outputs`")

    @property
    def block_size(self) -> int | None:
        """The quantization block of the stored tensors (a budget may pick another than
        --block-size), or None for a kept layer."""
        stored = self.weight or self.u
        return None if stored is None else stored.block_size

    def nbytes(self) -> int:
        """Bytes of the stored tensors (the bias and the format-5 marker apart)."""
        parts: dict[str, torch.Tensor] = {}
        for name in ("u", "v", "weight"):
            if getattr(self, name) is not None:
                parts.update(getattr(self, name).tensors(name))
        if self.s is not None:
            parts["s"] = self.s
        if self.sparse is not None:
            parts.update(self.sparse.tensors("sparse"))
        return sum(t.numel() * t.element_size() for t in parts.values())

    def dequantize(self) -> torch.Tensor | None:
        """Ŵ as the loaders compute it (float32), or None for a kept layer."""
        w_hat = None if self.weight is None else self.weight.dequantize()
        if self.u is not None:
            low = (self.u.dequantize().T * self.s) @ self.v.dequantize()
            w_hat = low if w_hat is None else w_hat + low
        if self.sparse is not None and w_hat is not None:
            w_hat = w_hat + self.sparse.dense().to(w_hat.device)
        if self.rows is not None:
            full = w_hat.new_zeros(self.outputs, w_hat.shape[1])
            full[runs_index(self.rows).to(w_hat.device)] = w_hat
            w_hat = full
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
