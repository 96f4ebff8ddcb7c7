"""The symmetric eigenproblems under the whitened factorizations: the damped Gram's square
root, and an eigendecomposition that does not give up where LAPACK's does."""
from __future__ import annotations

import torch

ROOT_DAMP = 1e-6  # the Gram's damping before its root, relative to its mean diagonal


def gram_root(gram: torch.Tensor, rel_damp: float = ROOT_DAMP) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A square root S of the damped Gram matrix (G + λI = S Sᵀ), float64, and its inverse
    where S is not triangular (a triangular S is solved with instead: `LayerStats.unwhiten`).

    ‖X Δᵀ‖_F = ‖Δ S‖_F, so S carries the calibration data into weight space. Cholesky first,
    with the damping raised tenfold while it fails; for a Gram that stays indefinite in
    floating point, the eigendecomposition (S = Q √Λ, eigenvalues floored at the damping).
    Beside the Gram, at most two in × in float64 matrices are alive (the damped copy and S:
    508 MB at 5632 inputs, where an identity and an inverse made it 1 GB).
    """
    g = gram.double()
    scale = float(g.diagonal().mean()) or 1.0
    for damp in (rel_damp, rel_damp * 10, rel_damp * 100, rel_damp * 1000):
        damped = g.clone()
        damped.diagonal().add_(damp * scale)
        root, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            return root, None
    values, vectors = eigh(g)
    values = values.clamp_min(rel_damp * scale).sqrt()
    return vectors * values, (vectors / values).T


def norm2(m: torch.Tensor) -> float:
    """‖m‖² summed in float64, with no squared copy of `m`."""
    return float(torch.linalg.vector_norm(m, dtype=torch.float64)) ** 2


def tail2(s: torch.Tensor, k: int) -> float:
    """Σ_{i≥k} sᵢ², summed in float64."""
    return float(s[k:].double().pow(2).sum())


def eigen_roots(m: torch.Tensor, rank: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Eigenvectors (columns) and the square roots of the eigenvalues of the symmetric PSD
    `m`, largest first (rounding's negative eigenvalues at 0); with `rank`, the first `rank`
    of them (copies: no view keeps the whole eigenbasis), and the cut-off roots' Σσ²."""
    values, vectors = eigh(m)
    vectors, roots = vectors.flip(1), values.flip(0).clamp_min(0).sqrt()
    if rank is None or rank >= len(roots):
        return vectors, roots, 0.0
    return vectors[:, :rank].clone(), roots[:rank].clone(), tail2(roots, rank)


def eigh(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.linalg.eigh` of the symmetric PSD `m` (eigenvalues ascending, eigenvectors as
    columns), which does not give up where LAPACK's does. Its divide and conquer fails now and
    then on matrices of low rank with many equal eigenvalues (PyTorch issue 145801 on the
    CPU); a progressive schedule's second stage met it on SmolLM2, where the error of a weight
    quantized a second time is mostly zero. Then: the same matrix shifted by δI (the same
    eigenvectors, eigenvalues δ higher), and failing that its SVD (a PSD matrix's singular
    vectors and values are its eigenvectors and eigenvalues)."""
    try:
        return torch.linalg.eigh(m)
    except torch.linalg.LinAlgError:
        pass
    delta = 1e-9 * (float(m.diagonal().abs().max()) or 1.0)
    try:
        values, vectors = torch.linalg.eigh(m + delta * torch.eye(len(m), dtype=m.dtype,
                                                                  device=m.device))
        return values - delta, vectors
    except torch.linalg.LinAlgError:
        u, values, _ = torch.linalg.svd(m)
        return values.flip(0), u.flip(1)
