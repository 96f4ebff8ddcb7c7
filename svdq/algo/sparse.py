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

`with_sparse` adds the term to a stored form in one step (the rank search uses it, so a
lower rank with a few exact entries can win); `refine_sparse` then alternates on the chosen
form, refitting it to W − S with the same rank and bits. The loaders apply S as a sparse
product (layers kept as stored) or fold it into the weight (`runtime`).

Bytes (CSR): values float16 (2 per entry), column indices int16 where `in` fits (else
int32), row pointers int32 (out + 1): `csr_bytes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import torch

from svdq.algo.error import error_norm2, relative_error
from svdq.algo.factorize import LayerStats

if TYPE_CHECKING:  # stored imports nothing of this module at run time
    from svdq.algo.stored import Stored

from svdq.runtime import INT16_COLUMNS  # noqa: E402  (the loaders read the same layout)


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
    device: torch.device = field(default=torch.device("cpu"), compare=False)  # where made (dense)

    @classmethod
    def of(cls, m: torch.Tensor) -> "CSR":
        """The nonzero entries of `m`, rounded to float16, row by row."""
        out_f, in_f = m.shape
        half = m.to(torch.float16)
        r, c = half.nonzero(as_tuple=True)  # row-major order
        counts = torch.bincount(r, minlength=out_f).cpu()
        rows = torch.zeros(out_f + 1, dtype=torch.int32)
        rows[1:] = counts.cumsum(0).to(torch.int32)
        cols = c.to(torch.int16 if in_f <= INT16_COLUMNS else torch.int32)
        return cls(half[r, c].cpu().contiguous(), cols.cpu().contiguous(), rows, (out_f, in_f),
                   m.device)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.cols, self.rows))

    def dense(self) -> torch.Tensor:
        """The matrix, float32, on `device`."""
        out = torch.zeros(self.shape, dtype=torch.float32)
        counts = self.rows[1:] - self.rows[:-1]
        r = torch.repeat_interleave(torch.arange(self.shape[0]), counts.long())
        # int16 indices above 32767 wrap negative: read them back as unsigned
        c = self.cols.long() % (1 << 16) if self.cols.dtype == torch.int16 else self.cols.long()
        out[r, c] = self.values.float()
        return out.to(self.device)

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        return {f"{key}.values": self.values, f"{key}.cols": self.cols, f"{key}.rows": self.rows}


def salient(delta: torch.Tensor, gram_diag: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` entries of `delta` with the largest |Δ_ij|² G_jj, as a matrix zero elsewhere."""
    out = torch.zeros(delta.shape, dtype=delta.dtype, device=delta.device)  # contiguous
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


def best_entries(delta: torch.Tensor, gram: torch.Tensor, k: int) -> torch.Tensor:
    """The sparse matrix of `k` entries that best corrects an error Δ on inputs with Gram G:
    entries chosen by the gain of each one alone at its best value, (Δ G)_ij² / G_jj (for a
    diagonal G the saliency |Δ_ij|² G_jj; a GPTQ error, whose entries compensate one another
    through G, has small gains where zeroing an entry would undo that), then the values of
    each row's chosen entries solved together, s_J = (Δ_i G)_J G_JJ⁻¹ — so the error
    ‖X (Δ − S)ᵀ‖² never exceeds ‖X Δᵀ‖²."""
    out = torch.zeros(delta.shape, dtype=torch.float32, device=delta.device)
    if k <= 0:
        return out
    g = gram.double().to(delta.device)
    dg = delta.double() @ g  # (out, in)
    diag = g.diagonal().clamp_min(1e-12)
    score = dg ** 2 / diag
    top = torch.topk(score.reshape(-1), min(k, score.numel())).indices.sort().values
    rows, cols = top // delta.shape[1], top % delta.shape[1]  # row by row, columns ascending
    counts = torch.bincount(rows, minlength=delta.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    for n in counts.unique().tolist():  # the rows with n entries, solved as one batch
        if n == 0:
            continue
        r = (counts == n).nonzero().squeeze(1)
        j = cols[starts[r, None] + torch.arange(n, device=r.device)]  # (rows, n)
        sub = g[j[:, :, None], j[:, None, :]]
        damp = 1e-9 * sub.diagonal(dim1=1, dim2=2).mean(1)
        sub = sub + damp[:, None, None] * torch.eye(n, dtype=sub.dtype, device=sub.device)
        out[r[:, None], j] = torch.linalg.solve(sub, dg[r[:, None], j]).float()
    return out


def sparse_count(out_f: int, in_f: int, fraction: float) -> int:
    """Entries a `--sparse FRACTION` term keeps in an (out, in) layer."""
    return math.floor(fraction * out_f * in_f)


def with_sparse(w: torch.Tensor, stored: "Stored", stats: LayerStats, ref: float,
                nnz: int) -> "Stored":
    """`stored` plus the `nnz` most salient entries of what it leaves, W − Ŵ, kept exactly
    (float16), and the error of the sum; kept and 16-bit dense layers stay as they are."""
    if nnz <= 0 or stored.kind == "keep" or (stored.kind == "dense" and stored.bits == 16):
        return stored
    w = w.float()
    approx = stored.dequantize()
    s = CSR.of(best_entries(w - approx, stats.gram, nnz))
    return replace(stored, sparse=s, error=relative_error(w, approx + s.dense(), stats, ref))


def refine_sparse(w: torch.Tensor, stored: "Stored", stats: LayerStats, ref: float,
                  refit: Callable[[torch.Tensor], "Stored"], rounds: int = 2) -> "Stored":
    """Alternate on a form with a sparse term: `refit` the form (same kind, rank, bits) to
    W − S, take the most salient entries of what it leaves as the new S; every round is
    measured and the best kept, so the result is never worse than `stored`."""
    if stored.sparse is None:
        return stored
    w, best, nnz = w.float(), stored, stored.sparse.nnz
    for _ in range(rounds):
        form = refit(w - best.sparse.dense())
        approx = form.dequantize()
        s = CSR.of(best_entries(w - approx, stats.gram, nnz))
        trial = replace(form, sparse=s, error=relative_error(w, approx + s.dense(), stats, ref))
        if trial.error >= best.error:
            break
        best = trial
    return best
