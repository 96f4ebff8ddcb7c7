"""Factorizations: W (out, in) -> U, Σ, Vᵀ with W ≈ U[:, :k] diag(Σ[:k]) Vᵀ[:k] for every k.

A method sees the weight and the calibration statistics of its layer and returns the full
factors once; the rank search only slices them, so each layer pays for one decomposition.
Methods are registered by name; `svdq compress --method NAME` picks one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class LayerStats:
    """Calibration statistics of one layer's inputs X (tokens × in), accumulated, never stored."""

    gram: torch.Tensor  # XᵀX, float64 (in, in)
    total: torch.Tensor  # Σ_t x_t, float64 (in,)
    tokens: int


@dataclass
class Factors:
    """`u` (out, r) with orthonormal columns, `s` (r,) descending, `vt` (r, in)."""

    u: torch.Tensor
    s: torch.Tensor
    vt: torch.Tensor

    @property
    def max_rank(self) -> int:
        return self.s.shape[0]


Method = Callable[[torch.Tensor, LayerStats], Factors]
METHODS: dict[str, Method] = {}


def register(name: str) -> Callable[[Method], Method]:
    def wrap(fn: Method) -> Method:
        METHODS[name] = fn
        return fn
    return wrap


@register("svd")
def plain_svd(w: torch.Tensor, stats: LayerStats) -> Factors:
    """Truncated SVD of the weight itself: optimal in ‖W − Ŵ‖_F, blind to the data."""
    u, s, vt = torch.linalg.svd(w.float(), full_matrices=False)
    return Factors(u, s, vt)


def factorize(method: str, w: torch.Tensor, stats: LayerStats) -> Factors:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[method](w, stats)
