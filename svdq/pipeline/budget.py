"""`svdq compress --ratio R | --size S`: one byte budget for all target layers together.

Every layer's options (`pipeline.options`) are measured on its calibration statistics,
together with the choices a uniform `--eps` would make. `allocate` then picks one option per
layer for the least Σ weight · error² within the budget, never worse than any of those uniform
settings that fits. A layer's weight is its loss sensitivity (`calibration.gradients`): the
mean squared loss gradient of its outputs times its output energy, so weight · error²
estimates the loss damage of its output error. That estimate is first-order: `candidates`
are the plans allocated under each error cap and the most exact plain quantization that fits
(with `--sparse`, also every plan a run without sparse terms would judge, so more options
never cost calibration loss), and a judge (the calibration loss of each plan, run end to end)
picks among them.

The allocation needs numbers only; building a plan needs each layer's statistics again. So a
budget runs in two passes over the blocks (`pipeline.two_pass`): the first keeps each layer's
option table, the second rebuilds the candidate plans' layers block by block, runs each plan's
own stream through the block, and keeps their tensors until the judge has spoken.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

from svdq.algo.allocate import Option, allocate, total
from svdq.algo.dense import stored_dense
from svdq.algo.error import reference
from svdq.algo.lowrank import break_even_rank
from svdq.algo.residual import Residual, refine_residual, residual_of
from svdq.algo.search import factor_bits
from svdq.algo.stored import Stored
from svdq.config import Settings
from svdq.errors import SvdqError
from svdq.models.layers import fp16_bytes, targets
from svdq.pipeline.fast import factor_dtype
from svdq.pipeline.measured import Measured
from svdq.pipeline.options import plus_sparse, stored_of
from svdq.pipeline.work import LayerWork

# Sensitivity × error² estimates a layer's damage only while the error is small: forms whose
# relative error exceeds a cap are left out whenever the budget can be met without them
# (measured on MiniLM at 0.285 × fp16: similarity 0.959 with them, 0.981 without a cap of
# 0.1). Each cap the budget allows gives a candidate plan; the calibration loss decides.
ERROR_CAPS = (0.1, 0.05, 0.02)
DAMAGE = 0.3  # a planned relative output error above this in any layer gets a loud warning


def check_request(model, settings: Settings) -> float:
    """Refuse a --size that compresses nothing (at least the target layers' fp16 bytes);
    returns the bits per weight the budget comes to."""
    fp16 = sum(fp16_bytes(model.get_submodule(n))
               for n in targets(model, settings.include, settings.exclude))
    if settings.budget_bytes is not None and settings.budget_bytes >= fp16:
        raise SvdqError(f"--size {settings.budget_bytes:,} bytes compresses nothing: the target "
                        f"layers take {fp16:,} bytes in float16; ask for less")
    return 16 * budget_of(settings, fp16) / fp16


def damage_warning(names: list[str], errors: list[float]) -> str | None:
    """A warning when the plan leaves layers with large predicted output errors."""
    bad = [(e, n) for n, e in zip(names, errors) if e > DAMAGE]
    if not bad:
        return None
    worst, name = max(bad)
    return (f"this budget leaves {len(bad)} of {len(names)} layers with a predicted relative "
            f"output error above {DAMAGE:g} (worst {worst:.2f}, {name}): expect a badly damaged "
            "model; raise the budget (--ratio/--size) and compare with svdq eval")


def budget_of(settings: Settings, fp16: int) -> int:
    if settings.budget_ratio is not None:
        return math.floor(settings.budget_ratio * fp16)
    return settings.budget_bytes


def candidates(measured: Measured, budget: int, block_size: int,
               few: bool = False) -> list[tuple[str, list[int]]]:
    """Allocations of `budget` worth comparing, as (label, option index per layer), best
    estimate first: the sensitivity-optimal one under each of `ERROR_CAPS` the budget allows
    (without any cap if it allows none), then the most exact uniform quantization without
    correction that fits (every layer at the most bits, then the smallest blocks, the budget
    allows), the floored and even plans; with sparse variants among the options, then every
    plan the same options without them give. Duplicates are dropped; none: nothing fits
    (`check_fits` says so). `few` (`--fast`): the best estimate, the plain quantization and
    the floored plan only."""
    options = measured.options
    found: list[tuple[str, list[int]]] = []
    for cap in ERROR_CAPS:
        capped = [[i for i, o in enumerate(opts) if o.error <= cap] for opts in options]
        if sum(min(options[n][i].bytes for i in idx) for n, idx in enumerate(capped)) > budget:
            continue
        sub = [[options[n][i] for i in idx] for n, idx in enumerate(capped)]
        where = [{i: j for j, i in enumerate(idx)} for idx in capped]
        uniform = [[where[n][i] for n, i in enumerate(c)] for c in measured.uniform.values()
                   if all(i in where[n] for n, i in enumerate(c))]
        found.append((f"error cap {cap:g}",
                      [capped[n][j] for n, j in enumerate(allocate(sub, budget, uniform))]))
        if few:
            break
    if not found:
        try:
            found.append(("no error cap", allocate(options, budget, list(measured.uniform.values()))))
        except ValueError:
            return []
    if any(o.sparse for opts in options for o in opts) and not few:  # and all a run without
        keep = [[i for i, o in enumerate(opts) if not o.sparse] for opts in options]  # them
        where = [{i: j for j, i in enumerate(idx)} for idx in keep]
        sparse_free = replace(measured, options=[[opts[i] for i in idx]
                                                 for opts, idx in zip(options, keep)],
                              uniform={eps: [where[n][i] for n, i in enumerate(c)]
                                       for eps, c in measured.uniform.items()})
        without = [(f"{label}, no sparse terms", [keep[n][j] for n, j in enumerate(plan)])
                   for label, plan in candidates(sparse_free, budget, block_size)]
    else:
        without = []
    forms = {(o.bits, o.block or block_size, o.grid) for o in options[0]
             if o.kind == "dense" and not o.sparse}
    plain = []
    for bits, block, grid in forms:  # each plain quantization of every layer
        plan = [next(i for i, o in enumerate(opts) if (o.kind, o.bits, o.block or block_size,
                                                       o.grid, o.sparse)
                     == ("dense", bits, block, grid, 0))
                for opts in options]
        size = total(options, plan)[0]
        if size <= budget:
            plain.append((size, -block, bits, grid, block, plan))
    if plain:  # the most exact that fits: the most bytes
        _, _, bits, grid, block, plan = max(plain)
        name = f"int{bits}" if grid == "int" else f"{bits}-bit"
        found.append((f"{name} in {'groups' if grid == 'int' else 'blocks'} of {block}, "
                      "no correction", plan))
        found += floored(options, budget, bits, plan)
        found += [] if few else even(options, budget, bits, block_size)
    unique: dict[tuple[int, ...], str] = {}
    for label, plan in found + without:
        unique.setdefault(tuple(plan), label)
    return [(label, list(plan)) for plan, label in unique.items()]


def floored(options: list[list[Option]], budget: int, bits: int,
            plain: list[int]) -> list[tuple[str, list[int]]]:
    """The sensitivity-optimal plan among the forms that keep every weight at `bits` or more
    (a quantized base, corrected or not, or the layer as it is; no low rank alone): the
    uniform plain quantization `plain` with its bytes moved between layers — groups, grids
    and corrections — rather than bits taken from the layers the estimate calls insensitive.
    On MiniLM at GPTQ w4 g64's bytes, calibrated on the source's inputs: calibration loss
    0.0181 against 0.0194 for uniform int4 g64 and 0.0243 for the plan capped at error 0.1,
    which stores four layers at 3 bits (benchmarks/gptq/candidates.py)."""
    idx = [[i for i, o in enumerate(opts) if o.kind == "keep"
            or (o.kind in ("dense", "residual") and (o.bits or 16) >= bits)] for opts in options]
    sub = [[options[n][i] for i in ii] for n, ii in enumerate(idx)]
    start = [[ii.index(i) for ii, i in zip(idx, plain)]]
    try:
        picks = allocate(sub, budget, start)
    except ValueError:
        return []
    return [(f"bases of {bits} bits or more, sensitivity-weighted",
             [ii[j] for ii, j in zip(idx, picks)])]


def even(options: list[list[Option]], budget: int, bits: int,
         block_size: int) -> list[tuple[str, list[int]]]:
    """EoRA's recipe as a candidate: one base at `bits` on every layer, each corrected at the
    same rank — the largest that fits (a layer whose ranks stop below it takes its largest
    below) — then what that leaves spent one rank step at a time on the layers of lowest rank
    (`_fill`). One such plan per base at `bits` every layer offers; the best estimate is kept.
    Where the sensitivity weights misjudge (Gemma-3-270M at GPTQ w4 g64 + EoRA r32's bytes: a
    third of the bytes went to 8-bit layers, perplexity 56.49 against GPTQ + EoRA's 55.59),
    this plan spends the bytes as EoRA does, and the judge compares."""
    def form(o: Option) -> tuple:
        return (o.bits, o.block or block_size, o.grid)
    keys = {form(o) for o in options[0] if o.kind == "residual" and o.bits == bits}
    best = None  # (estimate, label, plan)
    for key in sorted(keys):
        alone = [[i for i, o in enumerate(opts) if o.kind == "dense" and not o.sparse
                  and form(o) == key] for opts in options]
        ranked = [{o.rank: i for i, o in enumerate(opts) if o.kind == "residual"
                   and not o.sparse and form(o) == key} for opts in options]
        if not all(alone):
            continue
        for r in sorted({k for rk in ranked for k in rk}, reverse=True):
            plan = [rk[max(k for k in rk if k <= r)] if any(k <= r for k in rk) else a[0]
                    for rk, a in zip(ranked, alone)]
            if total(options, plan)[0] <= budget:
                plan = _fill(options, plan, ranked, budget)
                cost = total(options, plan)[1]
                ranks = [options[n][i].rank for n, i in enumerate(plan)]
                b, block, grid = key
                name = f"int{b} in groups" if grid == "int" else f"{b}-bit in blocks"
                if best is None or cost < best[0]:
                    best = (cost, f"{name} of {block}, a correction of rank {min(ranks)}–"
                                  f"{max(ranks)} on every layer", plan)
                break
    return [] if best is None else [best[1:]]


def _fill(options: list[list[Option]], plan: list[int], ranked: list[dict[int, int]],
          budget: int) -> list[int]:
    """`plan` with one layer at a time moved to the next rank of its grid, the layer of lowest
    rank first (then the cheapest step), while the budget allows."""
    plan, size = list(plan), total(options, plan)[0]
    while True:
        steps = []
        for n, rk in enumerate(ranked):
            now = options[n][plan[n]]
            up = min((k for k in rk if k > now.rank), default=None)
            if up is not None and size + options[n][rk[up]].bytes - now.bytes <= budget:
                steps.append((now.rank, options[n][rk[up]].bytes - now.bytes, n, rk[up]))
        if not steps:
            return plan
        _, extra, n, i = min(steps)
        plan[n], size = i, size + extra


def check_fits(found: list, measured: Measured, budget: int) -> None:
    """Refuse a budget below the smallest the layers can be stored in."""
    if found:
        return
    fp16, least = measured.fp16, sum(min(o.bytes for o in opts) for opts in measured.options)
    raise SvdqError(f"a budget of {budget:,} bytes ({budget / fp16:.3f} × fp16) is below "
                    f"the smallest these {len(measured.options)} layers can be stored in, "
                    f"{least:,} bytes ({least / fp16:.3f} × fp16); ask for at least that")


def base_of(option: Option, settings: Settings) -> tuple | None:
    """The quantized base a residual option corrects, (bits, block, grid), else None."""
    if option.kind != "residual":
        return None
    return (option.bits, option.block or settings.block_size, option.grid)


def build_layer(work: LayerWork, option: Option, settings: Settings,
                residuals: dict[tuple, Residual] | None = None, refine: bool = True) -> Stored:
    """The stored layer of `option` for `work`, exact, a correction refined (`refine`); the
    cache `residuals` holds the quantized bases (bits, block, grid) a layer's options share."""
    block, ref = settings.block_size, reference(work.w, work.bias, work.stats)
    if option.kind == "dense" and option.block is not None:  # the weight alone in its own blocks
        stored = stored_dense(work.w, work.stats, ref, option.bits, option.block, 0, option.grid,
                              settings.gptq)
        return plus_sparse(work.w, stored, work.stats, ref, option.sparse, settings.method,
                           settings.gptq) if option.sparse else stored
    res = None
    if option.kind == "residual":  # rebuilt, not kept for every layer
        key = base_of(option, settings)
        residuals = {} if residuals is None else residuals
        if key not in residuals:
            residuals[key] = residual_of(work.w, work.stats, *key[:2], settings.method, key[2],
                                         settings.gptq, factor_dtype(settings.fast))
        res = residuals[key]
    factors = work.factors if option.kind == "lowrank" else None
    k_break = break_even_rank(*work.w.shape, factor_bits(settings.bits), block)
    stored = stored_of(replace(option, sparse=0), work.w, work.bias, factors, work.stats, block,
                       k_break, res, settings.gptq)
    if not refine:  # the caller refines; no sparse term then
        return stored
    stored = refine_residual(work.w, stored, work.stats, ref, settings.method, gptq=settings.gptq)
    return plus_sparse(work.w, stored, work.stats, ref, option.sparse, settings.method,
                       settings.gptq) if option.sparse else stored


def summary(measured: Measured, budget: int, found: list[tuple[str, list[int]]],
            losses: list[float | None], best: int, errors: list[float],
            names: list[str]) -> dict:
    """What the manifest records of a budget: the request, the plan taken and the candidates
    judged (`losses`, None where not judged), the uniform-eps plans it had to beat."""
    options = measured.options
    label, picks = found[best]
    planned, planned_cost = total(options, picks)
    weights = [opts[0].weight for opts in options]
    weighted = any(o.weight != 1.0 for opts in options for o in opts)
    warning = damage_warning(names, errors)
    judged = [{"plan": lab, "bytes": total(options, plan)[0],
               "planned_error2": total(options, plan)[1], "calibration_loss": loss}
              for (lab, plan), loss in zip(found, losses)]
    return {"requested_bytes": budget, "planned_bytes": planned, "target_fp16_bytes": measured.fp16,
            **({"warning": warning} if warning else {}),
            "weights": weights, "planned_error2": planned_cost,
            "objective": "sensitivity-weighted error²" if weighted else "error²",
            "error_cap": next((c for c in ERROR_CAPS if label == f"error cap {c:g}"), None),
            "plan": label, "candidates": judged,
            "error2": math.fsum(opts[k].weight * e ** 2  # the token probe's factors too
                                for opts, k, e in zip(options, picks, errors)),
            "bits_choices": list(measured.bits_choices),
            "uniform": [dict(zip(("eps", "bytes", "error2"), (eps, *total(options, p))))
                        for eps, p in measured.uniform.items()]}


def pick(works: list[LayerWork], measured: Measured, budget: int, settings: Settings,
         judge: Callable[[list[Stored]], float] | None = None) -> tuple[list[Stored], dict]:
    """One stored form per layer of `works` (all in memory: sweep), within `budget` bytes, and
    what to record about it (`weights`: each layer's sensitivity, in the order of `works`).
    With a `judge` (the calibration loss of a list of stored forms) every candidate is built
    and judged and the lowest loss wins; without one the best estimate is taken."""
    found = candidates(measured, budget, settings.block_size, settings.fast)
    check_fits(found, measured, budget)
    if judge is None:
        found = found[:1]
    built, losses = [], []
    for label, plan in found:
        residuals = [dict() for _ in works]
        stored = [build_layer(w, opts[i], settings, r)
                  for w, opts, i, r in zip(works, measured.options, plan, residuals)]
        built.append(stored)
        losses.append(judge(stored) if judge is not None and len(found) > 1 else None)
    best = min(range(len(found)), key=lambda k: (losses[k] is None, losses[k] or 0.0, k))
    choices = built[best]
    return choices, summary(measured, budget, found, losses, best, [c.error for c in choices],
                            [w.name for w in works])
