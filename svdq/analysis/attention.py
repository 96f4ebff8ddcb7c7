"""The attention product: per head h, B_h = W_Q,hᵀ W_K,h (in × in), the only thing the scores
q_h · k_h = xᵀ B_h y depend on (biases aside). Its rank is at most the head width d; its
singular values come from two d × d triangles (QR of W_Q,hᵀ and W_K,hᵀ), never from the
in × in matrix itself.

Where the query and key sit differs by architecture; models with rotary position embeddings
rotate q and k by position before the product, so there B_h is not one matrix and the
product is refused (`why_not`).
"""
from __future__ import annotations

import torch
from torch import nn

from svdq.models.attention import FUSED, PAIRS, heads
from svdq.models.attention import why_not as names_why_not
from svdq.models.layers import weight_of


def why_not(model: nn.Module, block: nn.Module) -> str | None:
    """Why the attention product does not apply to `model`, or None where it does."""
    reason = names_why_not(model)
    if reason is None and qk_weights(block, heads(model)) is None:
        reason = f"svdq does not know where {type(model).__name__}'s queries and keys are"
    return reason


def qk_weights(block: nn.Module, n_heads: int) -> tuple[str, torch.Tensor, torch.Tensor] | None:
    """(query module name, W_Q, W_K) of a block, each (out, in) float32, or None."""
    names = dict(block.named_modules())
    for q, k in PAIRS:
        if q in names and k in names:
            return q, weight_of(names[q]).float(), weight_of(names[k]).float()
    if FUSED in names:
        w = weight_of(names[FUSED]).float()  # (3 · hidden, in): q, k, v stacked
        h = w.shape[0] // 3
        return FUSED, w[:h], w[h: 2 * h]
    return None


def _triangle(w: torch.Tensor) -> torch.Tensor:
    """R of the QR factorization of wᵀ (in × d): wᵀ = Q R, so w = Rᵀ Qᵀ."""
    return torch.linalg.qr(w.double().T, mode="r").R


def product_spectra(wq: torch.Tensor, wk: torch.Tensor, n_heads: int,
                    root: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Singular values of B_h = W_Q,hᵀ W_K,h for every head (each d values, descending);
    with `root` S (the block input's Gram = S Sᵀ) of Sᵀ B_h S, the product as the calibration
    inputs see it."""
    d = wq.shape[0] // n_heads
    out = []
    for h in range(n_heads):
        q, k = wq[h * d:(h + 1) * d].double(), wk[h * d:(h + 1) * d].double()
        if root is not None:
            q, k = q @ root, k @ root
        # qᵀ = Qq Rq, kᵀ = Qk Rk: B_h = qᵀ k = Qq (Rq Rkᵀ) Qkᵀ, so σ(B_h) = σ(Rq Rkᵀ)
        out.append(torch.linalg.svdvals(_triangle(q) @ _triangle(k).T).float())
    return out


def head_spectra(w: torch.Tensor, n_heads: int) -> list[torch.Tensor]:
    """Singular values of each head's rows of a projection (d × in)."""
    d = w.shape[0] // n_heads
    return [torch.linalg.svdvals(w[h * d:(h + 1) * d].double()).float() for h in range(n_heads)]
