"""A global byte budget: one stored form per layer, least Σ cost with Σ bytes ≤ budget.

Pure bookkeeping: numbers in, option indices out (the options are measured in
`svdq.pipeline.options`). Each layer offers options (kept as is; dense, low-rank or
quantized-plus-correction at a few ranks, per bit width), each with its exact bytes and
relative output error; its cost is error² times the layer's sensitivity weight (1 unless
given): a multiple-choice knapsack. Below, "error²" means that cost.
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


@dataclass(frozen=True)
class Option:
    """One stored form of a layer, without its tensors: kind 'keep', 'dense' (bits), 'lowrank'
    (rank, bits) or 'residual' (bits of the weight, rank of the correction), with its exact
    bytes and error. `weight` is the layer's sensitivity: the allocation minimizes
    Σ weight · error² (`cost`)."""

    bytes: int
    error: float
    kind: str
    rank: int
    bits: int | None
    weight: float = 1.0
    block: int | None = None  # quantization block size, None: the run's --block-size
    grid: str = "bnb"  # the weight's grid (dense, residual): bnb or int
    sparse: int = 0  # entries of a sparse term beside the form (`--sparse` in a budget), or 0

    @property
    def cost(self) -> float:
        return self.weight * self.error ** 2


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
        for i in _front(opts, unit):
            o, w = opts[i], -(-opts[i].bytes // unit)
            if w <= cap:
                trial = best[: cap + 1 - w] + o.cost
                better = trial < new[w:]
                torch.minimum(new[w:], trial, out=new[w:])  # in place: no copies
                pick[w:].masked_fill_(better, i)
        best = new
        picks.append(pick)
    if not math.isfinite(float(best[cap])):
        return None
    alloc, c = [0] * len(options), cap
    for layer in reversed(range(len(options))):
        alloc[layer] = int(picks[layer][c])
        c -= -(-options[layer][alloc[layer]].bytes // unit)
    return alloc


def _front(opts: list[Option], unit: int) -> list[int]:
    """The options `table` needs, in their order: one beaten by another that takes no more
    units and costs strictly less never makes a cheaper table entry than that other does."""
    least, keep = math.inf, set()
    for i in sorted(range(len(opts)), key=lambda i: (-(-opts[i].bytes // unit), opts[i].cost)):
        if opts[i].cost <= least:
            keep.add(i)
            least = opts[i].cost
    return sorted(keep)


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
