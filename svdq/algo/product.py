"""The attention-product form: queries and keys rewritten so that only their product is kept.

An attention head's scores depend on W_Q,h and W_K,h only through

    s(x, y) = (W_Q,h x + b_Q,h)ᵀ (W_K,h y + b_K,h) = x̃ᵀ M_h y + (terms constant in y)

with x̃ = [x; 1], W̃_Q,h = [W_Q,h | b_Q,h] and M_h = W̃_Q,hᵀ W_K,h ((in + 1) × in, rank ≤ d,
the head width). The terms without y (x̃ᵀ W̃_Q,hᵀ b_K,h) shift every score of one query by
the same amount, which the softmax ignores, so the key bias drops out and the query bias
stays, folded into x̃. A rank-r_h factorization M_h ≈ A_hᵀ B_h gives new projections: queries
A_h x̃ (r_h rows with a bias) and keys B_h y (no bias), q_proj and k_proj shrinking together.

The error is that of the scores on the calibration inputs, every query token against every
key token: ‖S̃ᵀ Δ_h S‖_F with G = S Sᵀ the inputs' Gram and G̃ = S̃ S̃ᵀ that of x̃ (the Gram
bordered by the input sum and the token count). Its optimum is the SVD of the whitened
product, which never needs the in × in matrices themselves: with C_q = W̃_Q G̃ W̃_Qᵀ = R_qᵀ R_q
and C_k = W_K G W_Kᵀ = R_kᵀ R_k (d × d), σ(S̃ᵀ M S) = σ(R_q R_kᵀ), and for R_q R_kᵀ = U Σ Vᵀ
the best rank-r factors are r combinations of the head's own rows: A = Σ_r^½ U_rᵀ R_q⁻ᵀ W̃_Q,
B = Σ_r^½ V_rᵀ R_k⁻ᵀ W_K (exact at r = d). Ranks are shared out across a layer's heads by
the largest σ², each rank costing the same bytes.
"""
from __future__ import annotations

from typing import Callable

from dataclasses import dataclass

import torch

from svdq.algo.factorize import LayerStats
from svdq.algo.spectral import eigh
from svdq.algo.quant import quantize

FLOOR = 1e-12  # eigenvalues of C_q, C_k below FLOOR × the largest are directions the data never reach


def bordered_gram(stats: LayerStats) -> torch.Tensor:
    """G̃ = Σ x̃ x̃ᵀ for x̃ = [x; 1]: the Gram bordered by the input sum and the token count."""
    n = stats.gram.shape[0]
    g = stats.gram.new_empty(n + 1, n + 1)
    g[:n, :n], g[:n, n], g[n, :n], g[n, n] = stats.gram, stats.total, stats.total, stats.tokens
    return g


def _root(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R⁻ᵀ, R) for a square root R of the symmetric c (Rᵀ R = c): R = Λ^½ Eᵀ, R⁻ᵀ = Λ^-½ Eᵀ
    (a pseudo-inverse: directions with no energy get zero rows)."""
    values, vectors = eigh(c)
    keep = values > FLOOR * values[-1].clamp_min(FLOOR)
    inv = torch.where(keep, values.clamp_min(FLOOR).rsqrt(), torch.zeros_like(values))
    return inv[:, None] * vectors.T, values.clamp_min(0).sqrt()[:, None] * vectors.T


@dataclass
class HeadProducts:
    """A layer's queries and keys, per head: the whitened product's singular values and the
    row combinations that give the best factors at any rank."""

    wq: torch.Tensor  # (heads·d, in + 1) float64: W̃_Q, the bias as the last column
    wk: torch.Tensor  # (heads·d, in) float64
    sigma: list[torch.Tensor]  # per head, (d,) descending
    tq: list[torch.Tensor]  # per head, (d, d): row j of the new queries = tq[j] @ W̃_Q,h
    tk: list[torch.Tensor]
    gram: torch.Tensor  # G̃ (in + 1, in + 1), float64
    wq_g: torch.Tensor  # W̃_Q G̃ and W_K G, made once for every trial's error
    wk_g: torch.Tensor
    heads: int

    @property
    def d(self) -> int:
        return self.wk.shape[0] // self.heads

    def total2(self) -> float:
        """‖S̃ᵀ M S‖²_F over the heads: the scores' energy, the error's denominator."""
        return float(sum((s.double() ** 2).sum() for s in self.sigma))

    def ranks(self, total: int) -> list[int]:
        """Per head, how many of the `total` largest singular values (across heads) it has."""
        if total <= 0:
            return [0] * self.heads
        flat = torch.cat([s ** 2 for s in self.sigma])
        top = torch.topk(flat, min(total, flat.numel())).indices
        return torch.bincount(top // self.d, minlength=self.heads).tolist()

    def factors(self, ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The new query rows (Σr, in + 1; the last column the bias) and key rows (Σr, in)."""
        d, q, k = self.d, [], []
        for h, r in enumerate(ranks):
            q.append(self.tq[h][:r] @ self.wq[h * d:(h + 1) * d])
            k.append(self.tk[h][:r] @ self.wk[h * d:(h + 1) * d])
        return torch.cat(q), torch.cat(k)

    def error2(self, ranks: list[int], q: torch.Tensor, k: torch.Tensor) -> float:
        """‖S̃ᵀ (Aᵀ B − M) S‖²_F summed over the heads, for new rows q, k (any values: the
        quantized ones), from small products: with X = [A; W̃_Q,h] and Y = [B; −W_K,h] the
        error is ⟨X G̃ Xᵀ, Y G Yᵀ⟩."""
        d, n, total, at = self.d, self.gram.shape[0] - 1, 0.0, 0
        q, k = q.double(), k.double()
        qg, kg = q @ self.gram, k @ self.gram[:n, :n]  # the new rows' products, all heads at once
        for h, r in enumerate(ranks):
            own = slice(h * d, (h + 1) * d)
            x = torch.cat([q[at:at + r], self.wq[own]])
            y = torch.cat([k[at:at + r], -self.wk[own]])
            xg = torch.cat([qg[at:at + r], self.wq_g[own]])
            yg = torch.cat([kg[at:at + r], -self.wk_g[own]])
            total += float(torch.sum((xg @ x.T) * (yg @ y.T)))
            at += r
        return max(total, 0.0)


def head_products(wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor, heads: int,
                  stats: LayerStats) -> HeadProducts:
    """The whitened SVD of every head's product from its (out, in) query and key weights."""
    d = wq.shape[0] // heads
    bias = torch.zeros(wq.shape[0], dtype=torch.float64) if bq is None else bq.double()
    wq_t = torch.cat([wq.double(), bias.to(wq.device)[:, None]], 1)
    wk64 = wk.double()
    g = bordered_gram(stats).to(wq.device)
    n = g.shape[0] - 1
    cq_all, ck_all = wq_t @ g, wk64 @ g[:n, :n]
    sigma, tq, tk = [], [], []
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        cq, ck = cq_all[rows] @ wq_t[rows].T, ck_all[rows] @ wk64[rows].T
        inv_q, rq = _root((cq + cq.T) / 2)
        inv_k, rk = _root((ck + ck.T) / 2)
        u, s, vt = torch.linalg.svd(rq @ rk.T)
        half = s.sqrt()[:, None]
        sigma.append(s)
        tq.append(half * (u.T @ inv_q))
        tk.append(half * (vt @ inv_k))
    return HeadProducts(wq_t, wk64, sigma, tq, tk, g, cq_all, ck_all, heads)


@dataclass(frozen=True)
class ProductForm:
    """A layer pair stored as the attention product: per-head ranks, the new rows quantized
    and the error on the scores (relative)."""

    ranks: list[int]
    q: object  # Quantized (Σr, in): the new query rows
    q_bias: torch.Tensor  # (Σr,) float32
    k: object  # Quantized (Σr, in): the new key rows
    error: float


def stored_product(products: HeadProducts, total: int, bits: int, block_size: int,
                   grid: str = "bnb") -> ProductForm:
    """The `total` largest singular values kept (shared out across heads), the rows quantized
    at `bits` on `grid`, and the relative error on the scores with those quantized rows."""
    ranks = products.ranks(total)
    q, k = products.factors(ranks)
    qq = quantize(q[:, :-1].float(), bits, block_size, grid)
    kq = quantize(k.float(), bits, block_size, grid)
    q_hat = torch.cat([qq.dequantize().double().to(q.device), q[:, -1:]], 1)
    ref = products.total2() or 1.0
    error = (products.error2(ranks, q_hat, kq.dequantize().double().to(k.device)) / ref) ** 0.5
    return ProductForm(ranks, qq, q[:, -1].float(), kq, error)


def smallest_product(products: HeadProducts, eps: float, bits: int, block_size: int,
                     grid: str = "bnb") -> ProductForm | None:
    """The product form with the fewest rows whose score error is ≤ eps (bisected: the error
    falls with the rows kept, up to quantization noise), or None where even every row misses."""
    hi = products.heads * products.d
    best = stored_product(products, hi, bits, block_size, grid)
    if best.error > eps:
        return None
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        trial = stored_product(products, mid, bits, block_size, grid)
        if trial.error <= eps:
            hi, best = mid, trial
        else:
            lo = mid
    return best


def largest_product(products: HeadProducts, fits: Callable[[ProductForm], bool], bits: int,
                    block_size: int, grid: str = "bnb") -> ProductForm | None:
    """The product form with the most rows that `fits` (its bytes fall with the rows:
    bisected), or None where even one row does not."""
    lo, hi = 0, products.heads * products.d
    best = None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = stored_product(products, mid, bits, block_size, grid)
        if fits(trial):
            lo, best = mid, trial
        else:
            hi = mid - 1
    return best


def runs(ranks: list[int], d: int, offset: int = 0) -> list[list[int]]:
    """The output rows the new rows fill: [start, length] per head that keeps any."""
    return [[offset + h * d, r] for h, r in enumerate(ranks) if r]
