"""A layer's stored form in the pipeline: chosen in eps mode (`choose_form`), refit
(`refitted`), and realized as its plan entry, artifact tensors and the module that computes it
as the loaders will (`realize`); the codebooks a plan's quantized tensors use (`codebooks`).
"""
from __future__ import annotations

import torch
from torch import nn

from svdq import runtime
from svdq.algo.error import reference
from svdq.algo.quant import codebook
from svdq.algo.refit import refit_u
from svdq.algo.residual import residual_of
from svdq.algo.search import choose, choose_residual, refined_sparse
from svdq.algo.sparse import sparse_count
from svdq.algo.stored import Stored
from svdq.config import Settings
from svdq.pipeline.work import LayerWork
from svdq.plan import LayerPlan, tensors_of


def realize(work: LayerWork, stored: Stored, settings: Settings,
            stored_dtype: torch.dtype | None = None
            ) -> tuple[LayerPlan, dict[str, torch.Tensor], nn.Module | None]:
    """Layer `work.name` stored as `stored`: its plan entry (`stored_dtype`: see
    `LayerPlan.of`), its artifact tensors and the module that computes it as the loaders will
    (None: the layer stays as it is)."""
    tensors = tensors_of(work.name, work.module, stored)
    plan = LayerPlan.of(work.name, work.module, stored, tensors, settings.block_size, stored_dtype)
    if stored.kind == "keep":
        return plan, tensors, None
    books = {runtime.codebook_key(b): codebook(b) for b in (4, 8)}
    module = runtime.build_layer(plan.to_json(), {**tensors, **books}, work.module.weight.dtype,
                                 set(), conv=runtime.conv_of(work.module))
    return plan, tensors, module.to(work.module.weight.device)


def choose_form(work: LayerWork, settings: Settings, residual=None) -> Stored:
    """The eps-mode choice for one layer: low rank replaces the weight, or with
    `settings.residual` corrects the weight's quantization error (`residual`: that error's
    factors, made here when not given)."""
    # --sparse: linear layers only (the loaders apply a sparse term to matrices, not kernels);
    # the form with the term is taken only where it stores fewer bytes at the same eps
    nnz = 0 if runtime.conv_of(work.module) else sparse_count(*work.w.shape, settings.sparse)
    if settings.residual:
        res = residual or residual_of(work.w, work.stats, settings.bits, settings.block_size,
                                      settings.method, settings.grid, settings.gptq)
        tried = [choose_residual(work.w, work.bias, res, work.stats, settings.eps,
                                 method=settings.method, sparse=n) for n in {0, nnz}]
    else:
        tried = [choose(work.w, work.bias, work.factors, work.stats, settings.eps,
                        settings.bits, settings.block_size, grid=settings.grid,
                        gptq=settings.gptq, sparse=n, method=settings.method)
                 for n in {0, nnz}]
    met = [t for t in tried if t.kind != "keep"]
    stored = min(met, key=lambda t: (t.nbytes(), t.error)) if met else tried[0]
    if stored.sparse is None:
        return stored
    return refined_sparse(work.w, stored, work.stats, reference(work.w, work.bias, work.stats),
                          settings.method, settings.gptq)


def refitted(work: LayerWork, stored: Stored, settings: Settings) -> tuple[Stored, dict]:
    """`--refit`: the stored form refit against the source, and what the manifest notes."""
    if not settings.refit:
        return stored, {}
    stored, before, after = refit_u(work.w, work.bias, stored, work.stats)
    return stored, {"source_error": after, "source_error_before_refit": before,
                    "refit": after < before}


def codebooks(plans: list[LayerPlan]) -> dict[str, torch.Tensor]:
    """The bitsandbytes code values the plans' quantized tensors use (the integer grid needs
    none)."""
    used = {p.bits for p in plans if p.grid == "bnb"} | {p.factor_bits for p in plans}
    return {runtime.codebook_key(b): codebook(b) for b in sorted(used & {4, 8})}
