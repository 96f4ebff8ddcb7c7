"""`--refit`: the least-squares U Σ of a stored low-rank or corrected layer, V and the dense
part fixed, against the source layer's outputs (DESIGN.md, "Refitting U")."""
from __future__ import annotations

from dataclasses import replace

import torch

from svdq.algo.error import reference, relative_error, source_error
from svdq.algo.factorize import LayerStats
from svdq.algo.quant import Quantized, quantize
from svdq.algo.stored import Stored


def refit_u(w: torch.Tensor, bias: torch.Tensor | None, stored: Stored,
            stats: LayerStats) -> tuple[Stored, float, float]:
    """Refit a low-rank or corrected layer's U in closed form, V and the dense part fixed.

    With D the stored dense part (0 for low rank) and V̂ the stored Vᵀ, the least-squares
    M = U Σ for the source layer's outputs, ‖X (D + M V̂)ᵀ − X₀ Wᵀ‖_F, is
    Mᵀ = (V̂ G V̂ᵀ)⁻¹ V̂ (C Wᵀ − G Dᵀ) with G = XᵀX and C = Xᵀ X₀ (`LayerStats.cross`; G without
    a source stream, where the refit still undoes what quantizing V̂ cost). Σ becomes the row
    norms of Mᵀ, U its normalized rows, quantized as before. Kept only if the error against
    the source (`source_error`) falls. Returns (stored, source error before, after)."""
    if stored.kind not in ("lowrank", "residual"):
        w_hat = stored.weight.dequantize() if stored.weight is not None else w
        e = source_error(w, bias, w_hat, stats)
        return stored, e, e
    vt = stored.v.dequantize().double()  # (k, in)
    d = (stored.weight.dequantize().double() if stored.kind == "residual"
         else torch.zeros_like(w, dtype=torch.float64))
    w64, gram = w.double(), stats.gram
    cross = gram if stats.cross is None else stats.cross
    p = vt @ gram @ vt.T
    r = vt @ (cross @ w64.T - gram @ d.T)  # (k, out)
    damp = 1e-9 * float(torch.trace(p)) / p.shape[0] + 1e-30
    mt = torch.linalg.solve(p + damp * torch.eye(p.shape[0], dtype=p.dtype, device=p.device), r)
    s = mt.norm(dim=1)
    ut = mt / s.clamp_min(1e-30)[:, None]
    u = quantize(ut.float(), stored.u.bits, stored.u.block_size)
    s = s.float().contiguous()

    def hat(u_q: Quantized, s_: torch.Tensor) -> torch.Tensor:
        return d.float() + (u_q.dequantize().T * s_) @ vt.float()

    before = source_error(w, bias, hat(stored.u, stored.s), stats)
    w_hat = hat(u, s)
    after = source_error(w, bias, w_hat, stats)
    if not after < before:
        return stored, before, before
    err = relative_error(w, w_hat, stats, reference(w, bias, stats))
    return replace(stored, u=u, s=s, error=err), before, after
