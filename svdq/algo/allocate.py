"""A global byte budget: one stored form per layer, least Σ cost with Σ bytes ≤ budget.

Each layer offers options (kept as is; dense, low-rank or quantized-plus-correction at a few
ranks, per bit width), each with its exact bytes and relative output error (`search`); its
cost is error² times the layer's sensitivity weight (1 unless given): a multiple-choice
knapsack. Below, "error²" means that cost.
`allocate` returns the best of (a) `greedy`: every layer at its cheapest option, then upgrades
along each layer's lower convex hull of (bytes, error²), most error² saved per extra byte first,
while they fit, then single option changes that lower Σ error² and fit; (b) `table`: dynamic
programming on a byte grid, exact at 1 byte per unit; (c) the candidates given (e.g. per-layer
eps choices), each improved as in (a). So it is never worse than any candidate.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from svdq.algo.factorize import Factors, LayerStats
from svdq.algo.quant import nbytes
from svdq.algo.search import (Choice, Residual, break_even_rank, lowrank_bytes, reference,
                              residual_break_rank, residual_bytes, stored_dense, stored_lowrank,
                              stored_residual)


@dataclass(frozen=True)
class Option:
    """One stored form of a layer: kind 'lowrank' (rank, bits), 'residual' (bits of the weight,
    rank of the correction) or 'dense' (bits; None: kept). `weight` is the layer's sensitivity:
    the allocation minimizes Σ weight · error² (`cost`)."""

    bytes: int
    error: float
    kind: str
    rank: int
    bits: int | None
    weight: float = 1.0
    block: int | None = None  # quantization block size, None: the run's --block-size

    @property
    def cost(self) -> float:
        return self.weight * self.error ** 2


def rank_grid(k_break: int, n: int = 12) -> list[int]:
    """About `n` ranks spaced geometrically from 1 to `k_break`, both included."""
    if k_break <= n:
        return list(range(1, k_break + 1))
    return sorted({max(1, round(k_break ** (i / (n - 1)))) for i in range(n)} | {k_break})


def k_break_of(w: torch.Tensor, factors: Factors, bits: int, block_size: int) -> int:
    return min(break_even_rank(*w.shape, bits, block_size), factors.max_rank)


def layer_options(w: torch.Tensor, bias: torch.Tensor | None, factors: Factors,
                  stats: LayerStats, bits_choices: Sequence[int], block_size: int,
                  ranks: Sequence[int] | None = None, elsize: int = 2,
                  cache: dict | None = None,
                  residuals: dict[tuple[int, int], Residual] | None = None,
                  weight: float = 1.0) -> list[Option]:
    """Kept as is (`elsize` bytes per source element, weight and bias), then per bits: dense, and
    low-rank at each rank of `ranks` (None: `rank_grid`) up to that bits' break-even rank; per
    entry of `residuals` ({bits: Residual}), the weight at those bits plus a correction at each
    rank of the grid up to `residual_break_rank`. Every option carries `weight`.
    `residuals` are keyed (bits, block size): a block size other than `block_size` also adds
    the weight alone at that block size (fewer scales: cheaper, a little less exact).
    Errors are `search.choose`'s; `cache` may be shared with `choose` calls on the layer."""
    out_f, in_f = w.shape
    bias_bytes = 0 if bias is None else bias.numel() * elsize
    ref = reference(w, bias, stats)
    cache = {} if cache is None else cache

    def grid(kb: int) -> list[int]:
        return rank_grid(kb) if ranks is None else sorted({r for r in ranks if 1 <= r <= kb})

    options = [Option((w.numel() * elsize) + bias_bytes, 0.0, "dense", 0, None, weight)]
    for bits in dict.fromkeys(bits_choices):
        kb = k_break_of(w, factors, bits, block_size)
        key = ("dense", bits, 0)
        cache[key] = cache.get(key) or stored_dense(w, stats, ref, bits, block_size, kb)
        options.append(Option(nbytes(w.numel(), bits, block_size) + bias_bytes, cache[key].error,
                              "dense", 0, bits, weight))
        for k in grid(kb):
            key = ("lowrank", bits, k)
            cache[key] = cache.get(key) or stored_lowrank(w, factors, stats, ref, k, bits,
                                                          block_size, kb)
            options.append(Option(lowrank_bytes(out_f, in_f, k, bits, block_size) + bias_bytes,
                                  cache[key].error, "lowrank", k, bits, weight))
    for (bits, block), res in (residuals or {}).items():
        tag = None if block == block_size else block
        if tag is not None:  # the weight alone at this block size: rank 0
            key = ("dense", bits, 0, block)
            cache[key] = cache.get(key) or stored_residual(w, res, stats, ref, 0, 0)
            options.append(Option(nbytes(w.numel(), bits, block) + bias_bytes, cache[key].error,
                                  "dense", 0, bits, weight, tag))
        kb = min(residual_break_rank(out_f, in_f, bits, block), res.factors.max_rank)
        for k in grid(kb):
            key = ("residual", bits, k, block)
            cache[key] = cache.get(key) or stored_residual(w, res, stats, ref, k, kb)
            options.append(Option(residual_bytes(out_f, in_f, k, bits, block) + bias_bytes,
                                  cache[key].error, "residual", k, bits, weight, tag))
    return options


def choice_of(option: Option, w: torch.Tensor, bias: torch.Tensor | None, factors: Factors,
              stats: LayerStats, block_size: int, k_break: int,
              residual: Residual | None = None) -> Choice:
    """The stored layer of `option`, rebuilt (deterministic: the same tensors and error);
    `k_break` is what a kept-as-is layer records; a residual option, or a dense one at its own
    block size, needs its `residual` (the weight quantized at its bits and block size)."""
    ref = reference(w, bias, stats)
    if option.kind == "residual" or option.block is not None:
        block = option.block or block_size
        if residual is None or (residual.weight.bits, residual.weight.block_size) != (option.bits, block):
            raise ValueError(f"a residual option at {option.bits} bits, block {block}, needs "
                             "its Residual")
        kb = min(residual_break_rank(*w.shape, option.bits, block), residual.factors.max_rank)
        return stored_residual(w, residual, stats, ref, option.rank, kb)
    if option.kind == "lowrank":
        kb = k_break_of(w, factors, option.bits, block_size)
        return stored_lowrank(w, factors, stats, ref, option.rank, option.bits, block_size, kb)
    if option.bits is not None:
        return stored_dense(w, stats, ref, option.bits, block_size,
                            k_break_of(w, factors, option.bits, block_size))
    return Choice("dense", 0, k_break, None, 0.0)


def _hull(opts: list[Option]) -> list[int]:
    """Indices on the lower convex hull of (bytes, error²), cheapest first, error falling."""
    hull: list[int] = []
    for i in sorted(range(len(opts)), key=lambda i: (opts[i].bytes, opts[i].error, i)):
        x, e = opts[i].bytes, opts[i].cost
        if hull and e >= opts[hull[-1]].cost:
            continue  # a cheaper option is at least as good
        while len(hull) >= 2:  # drop the last point while it lies above the chord to this one
            (xa, ea), (xb, eb) = ((opts[j].bytes, opts[j].cost) for j in hull[-2:])
            if (eb - ea) * (x - xb) <= (e - eb) * (xb - xa):
                break
            hull.pop()
        hull.append(i)
    return hull


def total(options: list[list[Option]], alloc: Sequence[int]) -> tuple[int, float]:
    """(Σ bytes, Σ cost) of an allocation."""
    return (sum(o[i].bytes for o, i in zip(options, alloc)),
            math.fsum(o[i].cost for o, i in zip(options, alloc)))


def _improve(options: list[list[Option]], alloc: list[int], budget: int) -> list[int]:
    """Apply the single option change that lowers Σ error² most and fits, until none does."""
    used = total(options, alloc)[0]
    while True:
        best = None  # (error² change, bytes change, layer, option)
        for layer, opts in enumerate(options):
            cur = opts[alloc[layer]]
            for i, o in enumerate(opts):
                d_err, d_bytes = o.cost - cur.cost, o.bytes - cur.bytes
                if d_err < 0 and used + d_bytes <= budget and (best is None
                                                               or (d_err, d_bytes) < best[:2]):
                    best = (d_err, d_bytes, layer, i)
        if best is None:
            return alloc
        used += best[1]
        alloc[best[2]] = best[3]


def greedy(options: list[list[Option]], budget: int) -> list[int] | None:
    """Cheapest start, hull upgrades by gain per byte (a heap), then `_improve`."""
    hulls = [_hull(opts) for opts in options]
    alloc, pos = [h[0] for h in hulls], [0] * len(options)
    used = total(options, alloc)[0]
    if used > budget:
        return None

    def push(layer: int) -> None:
        h, p = hulls[layer], pos[layer]
        if p + 1 < len(h):
            a, b = options[layer][h[p]], options[layer][h[p + 1]]
            heapq.heappush(heap, ((b.cost - a.cost) / (b.bytes - a.bytes), layer))

    heap: list = []
    for layer in range(len(options)):
        push(layer)
    while heap:
        _, layer = heapq.heappop(heap)
        h, p = hulls[layer], pos[layer]
        extra = options[layer][h[p + 1]].bytes - options[layer][h[p]].bytes
        if used + extra <= budget:  # else this layer stays where it is on its hull
            used, pos[layer], alloc[layer] = used + extra, p + 1, h[p + 1]
            push(layer)
    return _improve(options, alloc, budget)


def table(options: list[list[Option]], budget: int, resolution: int = 2 ** 20) -> list[int] | None:
    """Dynamic programming on a grid of `unit` = Σ largest options / resolution bytes (≥ 1),
    bytes rounded up: optimal on the grid (truly optimal at unit 1); Σ error² of its answer
    never rises with the budget (the grid does not depend on it)."""
    unit = max(1, -(-sum(max(o.bytes for o in opts) for opts in options) // resolution))
    cap = min(budget // unit, sum(-(-max(o.bytes for o in opts) // unit) for opts in options))
    best = torch.zeros(cap + 1, dtype=torch.float64)  # least Σ error² within c units, per c
    picks = []
    for opts in options:
        new = torch.full_like(best, math.inf)
        pick = torch.zeros(cap + 1, dtype=torch.int16)
        for i, o in enumerate(opts):
            w = -(-o.bytes // unit)
            if w <= cap:
                trial = best[: cap + 1 - w] + o.cost
                better = trial < new[w:]
                new[w:] = torch.where(better, trial, new[w:])
                pick[w:][better] = i
        best = new
        picks.append(pick)
    if not math.isfinite(float(best[cap])):
        return None
    alloc, c = [0] * len(options), cap
    for layer in reversed(range(len(options))):
        alloc[layer] = int(picks[layer][c])
        c -= -(-options[layer][alloc[layer]].bytes // unit)
    return alloc


def allocate(options: list[list[Option]], budget: int,
             candidates: Sequence[Sequence[int]] = ()) -> list[int]:
    """Option indices, one per layer, with Σ bytes ≤ `budget`: the least Σ error² of `greedy`,
    `table` and the feasible candidates after `_improve`. ValueError if nothing fits."""
    least = sum(min(o.bytes for o in opts) for opts in options)
    if least > budget:
        raise ValueError(f"a budget of {budget:,} bytes cannot be met: the smallest achievable "
                         f"for these layers is {least:,} bytes")
    found = [a for a in (greedy(options, budget), table(options, budget)) if a is not None]
    for cand in candidates:
        if len(cand) != len(options):
            raise ValueError(f"a candidate has {len(cand)} entries for {len(options)} layers")
        if total(options, cand)[0] <= budget:
            found.append(_improve(options, list(cand), budget))
    return min(found, key=lambda a: total(options, a)[::-1])
