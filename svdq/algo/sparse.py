"""The sparse term: W ≈ A + S, with A any stored form's approximation (quantized dense, low
rank, or the two together) and S a few entries kept exactly, in float16, as CSR.

Which entries: those where the error costs the output most. The output error of a change Δ is
tr(Δ G Δᵀ) (`algo.error`); keeping entry (i, j) exactly removes the error Δ_ij, and its share
of that trace, to first order, is Δ_ij² G_jj — the activation-aware saliency |Δ_ij|² G_jj.

How: GoDec-style alternation (Zhou & Tao 2011), with `fit` the stored form: S₀ = 0;
A_t = fit(W − S_t); S_{t+1} = the `k` most salient entries of W − A_t (their values exact).
The alternation is not monotone in the output error, so every iterate is measured exactly and
the best kept — never worse than A₀ = fit(W), S = 0, the form without a sparse term. Where the
few entries hold more energy than the rest, the first fit bends toward them and hard
thresholding can stall short of them (tests/algo/test_sparse.py).

This is the sparse term's math only: the stored forms, the loaders and the budget do not use
it yet (issue 14).

Bytes (CSR): values float16 (2 per entry), column indices int16 where `in` fits (else
int32), row pointers int32 (out + 1): `csr_bytes`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from svdq.algo.error import error_norm2
from svdq.algo.factorize import LayerStats

INT16_COLUMNS = 1 << 15  # column indices fit int16 below this many inputs


def csr_bytes(out_f: int, in_f: int, nnz: int) -> int:
    """Exact stored bytes of an (out, in) CSR matrix with `nnz` entries."""
    return 2 * nnz + (2 if in_f <= INT16_COLUMNS else 4) * nnz + 4 * (out_f + 1)


@dataclass(frozen=True)
class CSR:
    """An (out, in) sparse matrix as stored: values float16, column indices, row pointers."""

    values: torch.Tensor
    cols: torch.Tensor
    rows: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def of(cls, m: torch.Tensor) -> "CSR":
        """The nonzero entries of `m`, rounded to float16, row by row."""
        out_f, in_f = m.shape
        half = m.to(torch.float16)
        r, c = half.nonzero(as_tuple=True)  # row-major order
        counts = torch.bincount(r, minlength=out_f)
        rows = torch.zeros(out_f + 1, dtype=torch.int32)
        rows[1:] = counts.cumsum(0).to(torch.int32)
        cols = c.to(torch.int16 if in_f <= INT16_COLUMNS else torch.int32)
        return cls(half[r, c].contiguous(), cols.contiguous(), rows, (out_f, in_f))

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.cols, self.rows))

    def dense(self) -> torch.Tensor:
        """The matrix, float32."""
        out = torch.zeros(self.shape, dtype=torch.float32)
        counts = self.rows[1:] - self.rows[:-1]
        r = torch.repeat_interleave(torch.arange(self.shape[0]), counts.long())
        # int16 indices above 32767 wrap negative: read them back as unsigned
        c = self.cols.long() % (1 << 16) if self.cols.dtype == torch.int16 else self.cols.long()
        out[r, c] = self.values.float()
        return out

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        return {f"{key}.values": self.values, f"{key}.cols": self.cols, f"{key}.rows": self.rows}


def salient(delta: torch.Tensor, gram_diag: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` entries of `delta` with the largest |Δ_ij|² G_jj, as a matrix zero elsewhere."""
    out = torch.zeros_like(delta)
    if k <= 0:
        return out
    score = delta.double() ** 2 * gram_diag.double().clamp_min(0)
    top = torch.topk(score.reshape(-1), min(k, score.numel())).indices
    out.view(-1)[top] = delta.reshape(-1)[top]
    return out


@dataclass(frozen=True)
class Split:
    """W ≈ `approx` + `sparse`.dense(): the form's own approximation and the kept entries."""

    approx: torch.Tensor
    sparse: CSR
    error2: float  # ‖X (W − approx − S)ᵀ‖²_F
    errors2: list[float]  # every iterate's, the first with S = 0


def godec(w: torch.Tensor, stats: LayerStats, k: int, fit: Callable[[torch.Tensor], torch.Tensor],
          iters: int = 4) -> Split:
    """W ≈ fit(W − S) + S with S the `k` most salient entries, by alternation (see the
    module's docstring); the iterate with the lowest output error wins, S = 0 included."""
    w = w.float()
    diag = stats.gram.diagonal().float()
    approx = fit(w)
    empty = CSR.of(torch.zeros_like(w))
    best = Split(approx, empty, error_norm2(w - approx, stats), [])
    errors = [best.error2]
    for _ in range(iters if k > 0 else 0):
        s = CSR.of(salient(w - approx, diag, k))
        kept = s.dense()
        approx = fit(w - kept)
        e2 = error_norm2(w - approx - kept, stats)
        errors.append(e2)
        if e2 < best.error2:
            best = Split(approx, s, e2, [])
    return Split(best.approx, best.sparse, best.error2, errors)
