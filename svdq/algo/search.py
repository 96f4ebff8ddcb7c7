"""Per-layer choice under `--eps`: the smallest rank whose stored layer meets eps, else a
dense fallback (the layer quantized, or kept as is)."""
from __future__ import annotations

from typing import Callable

import torch

from svdq.algo.dense import stored_dense
from svdq.algo.error import reference
from svdq.algo.factorize import Factors, LayerStats, factorize
from svdq.algo.lowrank import k_break_of, stored_lowrank
from svdq.algo.residual import Residual, refine_residual, residual_of, stored_residual
from svdq.algo.sparse import best_entries, refine_sparse, salient, with_sparse
from svdq.algo.stored import Stored, keep


def smallest_rank(k_break: int, trial: Callable[[int], Stored], eps: float) -> Stored:
    """Bisect 1..k_break for the smallest rank whose `trial` meets eps, given that k_break
    does (the error falls with the rank up to quantization noise)."""
    lo, hi, best = 0, k_break, trial(k_break)  # invariant: rank lo fails, rank hi = best passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if trial(mid).error <= eps:
            hi, best = mid, trial(mid)
        else:
            lo = mid
    return best


def factor_bits(bits: int) -> int:
    """The bits of low-rank factors when weights take `bits`: the bnb grid's 4, 8 or 16 (the
    integer grid's 2 and 3 bits are for whole weights; factors take NF4 there)."""
    return bits if bits in (4, 8, 16) else 4


def choose(w: torch.Tensor, bias: torch.Tensor | None, factors: Factors, stats: LayerStats,
           eps: float, bits: int, block_size: int, cache: dict | None = None,
           grid: str = "bnb", gptq: bool = False, sparse: int = 0,
           method: str = "svd") -> Stored:
    """Binary-search the smallest rank in 1..k_break whose stored layer has error ≤ eps; else
    the weight quantized at `bits` on `grid` (by GPTQ with `gptq`) if that meets eps.

    Assumes the error falls with the rank (it does up to quantization noise); the answer k
    always meets eps and, when k > 1, rank k − 1 was measured not to. `cache` (one per layer,
    optional) keeps the stored layers tried, keyed (kind, bits, rank), for later calls.
    `sparse` entries kept exactly join every form tried (`algo.sparse.with_sparse`); its bytes
    are the same at every rank, so the break-even rank does not move. `method` factorizes
    W minus its most salient entries there (the second start of each trial).
    """
    if sparse:
        return _with_sparse_search(w, bias, factors, stats, eps, bits, block_size, grid, gptq,
                                   sparse, method)
    ref = reference(w, bias, stats)
    dense_bits, bits = bits, factor_bits(bits)
    k_break = k_break_of(w, factors, bits, block_size)
    cache = {} if cache is None else cache

    def lowrank(k: int) -> Stored:
        key = ("lowrank", bits, k)
        if key not in cache:
            cache[key] = stored_lowrank(w, factors, stats, ref, k, bits, block_size, k_break)
        return cache[key]

    if k_break > 0 and lowrank(k_break).error <= eps:
        return smallest_rank(k_break, lowrank, eps)
    key = ("dense", dense_bits, 0) if grid == "bnb" else ("dense", dense_bits, 0, block_size, grid)
    if key not in cache:
        cache[key] = stored_dense(w, stats, ref, dense_bits, block_size, k_break, grid, gptq)
    if cache[key].error <= eps:
        return cache[key]
    return keep(k_break)


def _with_sparse_search(w, bias, factors, stats, eps, bits, block_size, grid, gptq,
                        sparse, method) -> Stored:
    """`choose` where every form tried carries `sparse` exact entries. Each rank is tried
    from two starts, the better kept: the factors of W with the salient entries of what they
    leave, and the factors of W minus its own most salient entries (where a few large
    entries dominate W's spectrum, the first start spends its rank on them)."""
    ref = reference(w, bias, stats)
    dense_bits, bits = bits, factor_bits(bits)
    k_break = k_break_of(w, factors, bits, block_size)
    spikes = salient(w.float(), stats.gram.diagonal().float(), sparse)
    others = factorize(method, w.float() - spikes, stats)
    k = max(1, k_break // 4)  # a rank that cannot absorb many spikes
    for _ in range(2):  # GoDec: the entries no rank should be spent on
        low = (others.u[:, :k] * others.s[:k]) @ others.vt[:k]
        spikes = best_entries(w.float() - low.float(), stats.gram, sparse)
        others = factorize(method, w.float() - spikes, stats)
    k_break = min(k_break, others.max_rank)
    tried: dict[int, Stored] = {}

    def lowrank(k: int) -> Stored:
        if k not in tried:
            starts = [with_sparse(w, stored_lowrank(w, f, stats, ref, k, bits, block_size,
                                                    k_break), stats, ref, sparse)
                      for f in (factors, others)]
            tried[k] = min(starts, key=lambda st: st.error)
        return tried[k]

    if k_break > 0 and lowrank(k_break).error <= eps:
        return smallest_rank(k_break, lowrank, eps)
    dense = with_sparse(w, stored_dense(w, stats, ref, dense_bits, block_size, k_break, grid,
                                        gptq), stats, ref, sparse)
    return dense if dense.error <= eps else keep(k_break)


def refined_sparse(w: torch.Tensor, stored: Stored, stats: LayerStats, ref: float,
                   method: str, gptq: bool = False, rounds: int = 2) -> Stored:
    """`algo.sparse.refine_sparse` with the refit of `stored`'s own form: its factorization
    (`method`) at its rank and bits, its weight re-quantized on its grid, or both."""
    if stored.sparse is None:
        return stored
    q = stored.weight

    def refit(target: torch.Tensor) -> Stored:
        if stored.kind == "lowrank":
            return stored_lowrank(target, factorize(method, target, stats), stats, ref,
                                  stored.rank, stored.bits, stored.u.block_size, stored.k_break)
        if stored.kind == "dense":
            return stored_dense(target, stats, ref, q.bits, q.block_size, stored.k_break,
                                q.grid, gptq)
        res = residual_of(target, stats, q.bits, q.block_size, method, q.grid, gptq)
        return stored_residual(target, res, stats, ref, stored.rank, stored.k_break)
    return refine_sparse(w, stored, stats, ref, refit, rounds)


def choose_residual(w: torch.Tensor, bias: torch.Tensor | None, res: Residual, stats: LayerStats,
                    eps: float, method: str | None = None, sparse: int = 0) -> Stored:
    """The smallest correction rank (0 = the quantized weight alone) whose stored layer has
    error ≤ eps, up to `residual_break_rank`; the layer is kept as is if even that fails.
    With `method` (the factorization of `res`) the answer is then `refine_residual`d.
    `sparse`: exact entries joining every form tried, as in `choose`."""
    ref = reference(w, bias, stats)
    k_break = res.k_break(*w.shape)
    tried: dict[int, Stored] = {}

    def trial(k: int) -> Stored:
        if k not in tried:
            tried[k] = with_sparse(w, stored_residual(w, res, stats, ref, k, k_break), stats,
                                   ref, sparse)
        return tried[k]

    if trial(0).error <= eps:
        return trial(0)
    if k_break == 0 or trial(k_break).error > eps:
        return keep(k_break)
    best = smallest_rank(k_break, trial, eps)
    if best.sparse is not None:  # refined with its sparse term by the caller
        return best
    return refine_residual(w, best, stats, ref, method, gptq=res.gptq) if method else best
