"""Factorizations: W (out, in) -> U, Σ, Vᵀ with W ≈ U[:, :k] diag(Σ[:k]) Vᵀ[:k] for every k.

A method sees the weight and the calibration statistics of its layer and returns the full
factors once; the rank search only slices them, so each layer pays for one decomposition.
Methods are registered by name; `svdq compress --method NAME` picks one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from svdq.algo.spectral import ROOT_DAMP, eigen_roots, gram_root, norm2, tail2


@dataclass
class LayerStats:
    """Calibration statistics of one layer's inputs X (tokens × in), accumulated, never stored."""

    gram: torch.Tensor  # XᵀX, float64 (in, in)
    total: torch.Tensor  # Σ_t x_t, float64 (in,)
    tokens: int
    abs_total: torch.Tensor | None = None  # Σ_t |x_t|, float64 (in,), for activation scaling
    # Gradient statistics (`calibrate.gradients`), only where asked for:
    # Σ_samples Σ_j (∂L_s/∂W_ij)², float64 (out,): the diagonal empirical Fisher of each row of W
    row_fisher: torch.Tensor | None = None
    # Σ_tokens ‖∂L/∂y_t‖²: how much the loss moves with the layer's output y
    grad2: float | None = None
    # `--sequential --refit`: the same layer's inputs x₀ in the source model on the source
    # stream, token for token with X: Σ x x₀ᵀ (in, in), Σ x₀ x₀ᵀ and Σ x₀, float64
    cross: torch.Tensor | None = None
    source_gram: torch.Tensor | None = None
    source_total: torch.Tensor | None = None
    # A budget's token probe (causal LMs): the inputs of the first calibration tokens the
    # gradient pass saw, float32 (n, in), and each one's ‖∂L/∂y_t‖² at this layer (n,)
    probe: torch.Tensor | None = None
    token_g2: torch.Tensor | None = None
    # the sums weigh each token by its own ‖∂L/∂y_t‖² (over their mean): Σ w_t x_t x_tᵀ, Σ w_t x_t
    # (a budget's token-weighted statistics, `pipeline.probe.WEIGHED`)
    weighted: bool = False
    # what is derived from the Gram once and shared by every form of the layer (its root, GPTQ's
    # inverse Hessian), by name
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def gram_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The Gram in `dtype`: itself in float64, else a copy made once per Gram (`--fast`'s
        float32 products: its bases' SVDs and error forms all read the one copy)."""
        if self.gram.dtype == dtype:
            return self.gram
        held = self.cache.get(("gram", dtype))
        if held is None or held[0] is not self.gram:
            held = self.cache[("gram", dtype)] = (self.gram, self.gram.to(dtype))
        return held[1]

    def root(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The Gram's square root S (`gram_root`), made once: every whitened factorization of
        the layer (its weight, each quantized base's error) shares it. Its inverse is None
        where S is the lower Cholesky factor (`unwhiten` solves with it instead of keeping a
        second in × in float64 matrix: 254 MB at 5632 inputs)."""
        if "root" not in self.cache:
            self.cache["root"] = gram_root(self.gram)
        return self.cache["root"]

    def unwhiten(self, vt: torch.Tensor) -> torch.Tensor:
        """Vᵀ S⁻¹ for rows `vt` of the whitened space (float64)."""
        root, inverse = self.root()
        if inverse is not None:
            return vt.double() @ inverse
        return torch.linalg.solve_triangular(root, vt.double(), upper=False, left=False)


@dataclass
class Factors:
    """`u` (out, r), `s` (r,), `vt` (r, in): W ≈ u[:, :k] diag(s[:k]) vt[:k] for every k.

    Ranks are taken in the order of the columns: the first k are the method's best rank-k
    approximation. For `svd`, `whiten` and `asvd` u has orthonormal columns and s descends;
    for `fisher` u's columns have unit norm but are not orthogonal, and s need not descend
    (the order is that of the row-weighted singular values, which is what FWSVD truncates).
    """

    u: torch.Tensor
    s: torch.Tensor
    vt: torch.Tensor
    # ‖X Wᵀ‖² = tr(W G Wᵀ) of the factorized W, where its factorization had it for free
    # (`whiten`: the trace of a product it makes anyway), in the factorization's dtype; else None
    energy: float | None = None
    # Σσ² of the triples past the last one kept (factors cut at a rank: `top`), float64
    rest2: float = 0.0

    @property
    def max_rank(self) -> int:
        return self.s.shape[0]

    def total2(self) -> float:
        """Σσ² over every triple, those cut off included."""
        return tail2(self.s, 0) + self.rest2

    def top(self, k: int) -> "Factors":
        """The first `k` triples (copies: no view keeps the rest), what they leave in `rest2`."""
        if k >= self.max_rank:
            return self
        return Factors(self.u[:, :k].clone(), self.s[:k].clone(), self.vt[:k].clone(),
                       self.energy, self.rest2 + tail2(self.s, k))


Method = Callable[..., Factors]  # (w, stats, dtype=float64): the weight's factors
METHODS: dict[str, Method] = {}


def register(name: str) -> Callable[[Method], Method]:
    def wrap(fn: Method) -> Method:
        METHODS[name] = fn
        return fn
    return wrap


@register("svd")
def plain_svd(w: torch.Tensor, stats: LayerStats, dtype: torch.dtype = torch.float64) -> Factors:
    """Truncated SVD of the weight itself: optimal in ‖W − Ŵ‖_F, blind to the data; in
    float32 whatever `dtype` (its factors' precision: nothing is squared here)."""
    u, s, vt = torch.linalg.svd(w.float(), full_matrices=False)
    return Factors(u, s, vt)


ROWS = 512  # rows per band of the whitening's float64 products


@register("whiten")
def whitened_svd(w: torch.Tensor, stats: LayerStats, dtype: torch.dtype = torch.float64,
                 rank: int | None = None) -> Factors:
    """Truncation-aware SVD (SVD-LLM): factorize A = W S with G = S Sᵀ, store Vᵀ S⁻¹.

    Truncating W S at rank k is then optimal for the output error on the calibration inputs,
    and that error is exactly sqrt(Σ_{i>k} σᵢ²) / ‖X Wᵀ‖ before quantization.

    The SVD comes from the eigendecomposition of A's smaller Gram, in float64: three times
    faster than a float32 SVD of A at 2048 × 5632, as exact in σ (~1e-7 of σ₁). Where W has
    no more rows than columns no root is needed at all: A Aᵀ = W (G + λI) Wᵀ, and the stored
    Vᵀ S⁻¹ = Σ⁻¹ Uᵀ W — no in × in root or solve at a 5632-input layer.

    `dtype` float32 (`--fast`'s bases): the products and the eigendecomposition in float32,
    about half the time (a 576 × 1536 error: 47 ms against 87, `benchmarks/kernel_speed.py`),
    σ² to ~1e-7 of σ₁²; the Gram's float32 copy is `LayerStats.gram_as`'s, shared with the
    error forms (`error.products_in`). The wide branch adds λ W to W G's band before the last
    product (no product of its own for λ W Wᵀ) and takes the energy from W G's band as
    `error.trace_form` does.

    `rank`: only the first `rank` triples are made (the eigendecomposition is whole either
    way); where the rank is known — a chosen correction's refinement — Vᵀ's other rows, or
    U's other columns and their unwhitening, would be made only to be dropped.
    """
    w64 = w.to(dtype)
    out_f, in_f = w64.shape
    if out_f <= in_f:
        gram = stats.gram_as(dtype).to(w64.device)
        damp = ROOT_DAMP * (float(gram.diagonal().mean()) or 1.0)  # gram_root's first damping
        m = torch.empty(out_f, out_f, dtype=dtype, device=w64.device)
        energy = torch.zeros((), dtype=torch.float64, device=w64.device)
        for i in range(0, out_f, ROWS):  # W (G + λI) Wᵀ a band of rows at a time: no out × in
            band = w64[i:i + ROWS]  # temporary, and λ W Wᵀ without a product of its own
            wg = band @ gram
            energy += torch.sum(wg * band, dtype=torch.float64)  # tr(W G Wᵀ) as error.trace_form
            m[i:i + ROWS] = wg.add_(band, alpha=damp) @ w64.T
        energy = float(energy)
        u, s, rest2 = eigen_roots(m, rank)
        del m
        vt = torch.empty(len(s), in_f, device=w64.device)
        for i in range(0, len(s), ROWS):
            uw = u[:, i:i + ROWS].T @ w64
            # σᵢ² ≥ λ‖uᵢᵀW‖² exactly; holding to it in floating point bounds Vᵀ's rows by 1/√λ
            s[i:i + ROWS] = torch.maximum(s[i:i + ROWS], damp ** 0.5 * uw.norm(dim=1))
            vt[i:i + ROWS] = uw / torch.where(s[i:i + ROWS] > 0, s[i:i + ROWS], 1.0)[:, None]
        return Factors(u.float(), s.float(), vt, energy, rest2)
    root, inverse = stats.root()
    a = w64 @ root.to(dtype)
    energy = None
    if inverse is None:  # Cholesky: S Sᵀ = G + λI, so ‖W S‖² = tr(W G Wᵀ) + λ‖W‖²
        damp = (float(root.pow(2).sum()) - float(stats.gram.diagonal().sum())) / in_f
        energy = norm2(a) - damp * norm2(w64)
    del w64  # (a float64 copy of W: 92 MB at 5632 × 2048)
    v, s, rest2 = eigen_roots(a.T @ a, rank)
    u = (a @ v) / torch.where(s > 0, s, torch.ones_like(s))
    return Factors(u.float(), s.float(), stats.unwhiten(v.T).float(), energy, rest2)


ASVD_ALPHA = 0.5


@register("asvd")
def activation_aware_svd(w: torch.Tensor, stats: LayerStats,
                         dtype: torch.dtype = torch.float64) -> Factors:
    """ASVD: scale input channel j by (mean |x_j|)^α, factorize, fold 1/scale back into Vᵀ.

    Channels that carry large activations weigh more in the truncation, a cheap, diagonal
    stand-in for whitening.
    """
    if stats.abs_total is None:
        raise ValueError("asvd needs the mean |x| per input channel (LayerStats.abs_total)")
    mean_abs = (stats.abs_total / max(stats.tokens, 1)).double()
    scale = mean_abs.clamp_min(1e-8 * float(mean_abs.max() or 1.0)) ** ASVD_ALPHA
    u, s, vt = torch.linalg.svd((w.double() * scale).to(dtype), full_matrices=False)
    return Factors(u.float(), s.float(), (vt / scale.to(dtype)).float())


@register("fisher")
def fisher_weighted_svd(w: torch.Tensor, stats: LayerStats,
                        dtype: torch.dtype = torch.float64) -> Factors:
    """FWSVD (Hsu et al. 2022): rows weighted by the square root of their summed Fisher.

    With r_i = sqrt(Σ_j F_ij) (F the diagonal empirical Fisher of W's entries), factorize
    diag(r) W = U Σ Vᵀ, so truncating at rank k minimizes Σ_i r_i² ‖(W − Ŵ)_i‖² — rows the loss
    is sensitive to are kept more exactly — and fold diag(1/r) back into U. The columns of
    diag(1/r) U are then rescaled to unit norm, their norms moved into s: u's columns have unit
    norm but are not orthogonal, and s is not sorted; rank k is still the first k columns.
    Row Fisher sums are floored at 1e-8 of the largest (weights at 1e-4), so no row is dropped
    and 1/r stays well within float64's reach; all-zero gradient statistics give the plain SVD.
    """
    if stats.row_fisher is None:
        raise ValueError("fisher needs gradient statistics (LayerStats.row_fisher)")
    fisher = stats.row_fisher.to(device=w.device, dtype=torch.float64).clamp_min(0)
    top = float(fisher.max()) if fisher.numel() else 0.0
    if not top > 0:  # no gradient reached the layer (or NaN): nothing to weight by
        fisher = torch.ones_like(fisher)
        top = 1.0
    r = fisher.clamp_min(1e-8 * top).sqrt()
    u, s, vt = torch.linalg.svd((w.double() * r[:, None]).to(dtype), full_matrices=False)
    u = u.double() / r[:, None]
    norms = torch.linalg.vector_norm(u, dim=0)
    return Factors((u / norms).float(), (s * norms).float(), vt.float())


def factorize(method: str, w: torch.Tensor, stats: LayerStats,
              dtype: torch.dtype = torch.float64, rank: int | None = None) -> Factors:
    """`w`'s factors by `method`, decomposed in `dtype` (float32: `--fast`'s bases); with
    `rank`, only the first `rank` (`whiten` makes no others; the rest are sliced)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    if METHODS[method] is whitened_svd:
        return whitened_svd(w, stats, dtype, rank)
    f = METHODS[method](w, stats, dtype)
    return f if rank is None else f.top(rank)
