"""`svdq compress --ratio R | --size S`: one byte budget for all target layers together.

Every layer's options (`algo.allocate.layer_options`: kept as is; dense and low-rank at a grid
of ranks, at `--bits`, 4 and 8 bits; the weight at 4 or 8 bits, also in 4× larger blocks,
alone or plus a low-rank correction of its quantization error) are measured on its
calibration statistics, together with the choices
a uniform `--eps` would make at a few eps values. `allocate` then picks one option per layer
for the least Σ weight · error² within the budget, never worse than any of those uniform
settings that fits. A layer's weight is its loss sensitivity when gradients were gathered
(`LayerStats.grad2`): the mean squared loss gradient of its outputs times its output energy,
so that weight · error² estimates the loss damage of its output error; 1 otherwise. That
estimate is first-order: `pick` builds the plans allocated under each error cap and the most
exact plain quantization that fits, and a judge (the calibration loss) picks among them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from svdq.algo.allocate import Option, allocate, choice_of, k_break_of, layer_options, total
from svdq.algo.quant import nbytes
from svdq.algo.search import (Choice, choose, lowrank_bytes, output_norm2, reference,
                              refine_residual, residual_of, stored_dense)
from svdq.config import Settings
from svdq.errors import SvdqError

if TYPE_CHECKING:
    from svdq.compress import LayerWork

UNIFORM_EPS = (0.02, 0.05, 0.1, 0.2, 0.3)  # the per-layer eps settings the result must beat
# Sensitivity × error² estimates a layer's damage only while the error is small: forms whose
# relative error exceeds a cap are left out whenever the budget can be met without them
# (measured on MiniLM at 0.285 × fp16: similarity 0.959 with them, 0.981 without a cap of
# 0.1). Each cap the budget allows gives a candidate plan; the calibration loss decides.
ERROR_CAPS = (0.1, 0.05, 0.02)
# The weights a low-rank correction is offered on: (bits, block size as a multiple of
# --block-size). Both precisions also in blocks 4× larger: a quarter of the scales, which pays
# for corrections where they matter most. At 8 bits this is what lets a budget of 8-bit's own
# bytes beat it without 4-bit layers (MiniLM at 0.534 × fp16: 0.99979 against 8-bit's 0.99972;
# 0.9991 without these blocks).
RESIDUAL_BASES = ((4, 1), (4, 4), (8, 1), (8, 4))


def fp16_bytes(work: "LayerWork") -> int:
    return 2 * (work.w.numel() + (0 if work.bias is None else work.bias.numel()))


def sensitivities(works: list["LayerWork"]) -> list[float]:
    """Per layer, how much loss a relative output error costs, scaled to average 1; all 1
    without gradient statistics."""
    if any(w.stats.grad2 is None for w in works):
        return [1.0] * len(works)
    raw = [w.stats.grad2 / (w.stats.tokens * w.w.shape[0]) * output_norm2(w.w, w.bias, w.stats)
           for w in works]
    mean = sum(raw) / len(raw) or 1.0
    return [r / mean for r in raw]


@dataclass
class Measured:
    """Every layer's options and the uniform-eps allocations, measured once for any budget."""

    options: list[list[Option]]
    uniform: dict[float, list[int]]
    bits_choices: tuple[int, ...]
    fp16: int


def _option(choice: Choice, work: "LayerWork", options: list[Option], block_size: int,
            weight: float) -> int:
    """The index of `choice` among `options`, appended there if it is not one of them."""
    for i, o in enumerate(options):
        if (o.kind, o.rank, o.bits, o.block) == (choice.kind, choice.rank, choice.bits, None):
            return i
    bias = 0 if work.bias is None else work.bias.numel() * work.module.weight.element_size()
    if choice.kind == "lowrank":
        size = lowrank_bytes(*work.w.shape, choice.rank, choice.bits, block_size)
    else:  # quantized dense: the kept-as-is option is always there
        size = nbytes(work.w.numel(), choice.bits, block_size)
    options.append(Option(size + bias, choice.error, choice.kind, choice.rank, choice.bits, weight))
    return len(options) - 1


def measure(works: list["LayerWork"], settings: Settings,
            report: Callable[[str, int, int], None]) -> Measured:
    """Options of every layer, residual forms included (the allocator decides where a
    correction pays), and the uniform-eps allocations."""
    bits_choices = tuple(dict.fromkeys((settings.bits, 4, 8)))
    weights = sensitivities(works)
    options, uniform = [], {eps: [] for eps in UNIFORM_EPS}
    for n, (work, weight) in enumerate(zip(works, weights)):
        report("budget: options per layer", n, len(works))
        cache: dict = {}  # stored forms measured for this layer, shared by all the calls below
        residuals = {(b, m * settings.block_size): residual_of(work.w, work.stats, b,
                                                               m * settings.block_size,
                                                               settings.method)
                     for b, m in RESIDUAL_BASES}
        opts = layer_options(work.w, work.bias, work.factors, work.stats, bits_choices,
                             settings.block_size, elsize=work.module.weight.element_size(),
                             cache=cache, residuals=residuals, weight=weight)
        for eps in UNIFORM_EPS:
            c = choose(work.w, work.bias, work.factors, work.stats, eps, settings.bits,
                       settings.block_size, cache=cache)
            uniform[eps].append(_option(c, work, opts, settings.block_size, weight))
        options.append(opts)
    report("budget: options per layer", len(works), len(works))
    return Measured(options, uniform, bits_choices, sum(fp16_bytes(w) for w in works))


DAMAGE = 0.3  # a planned relative output error above this in any layer gets a loud warning


def check_request(model, settings: Settings) -> None:
    """Refuse a --size that compresses nothing (at least the target layers' fp16 bytes)."""
    from svdq import surgery
    from svdq.hf import weight_of

    if settings.budget_bytes is None:
        return
    fp16 = 0
    for name in surgery.targets(model, settings.include, settings.exclude):
        layer = model.get_submodule(name)
        bias = getattr(layer, "bias", None)
        fp16 += 2 * (weight_of(layer).numel() + (0 if bias is None else bias.numel()))
    if settings.budget_bytes >= fp16:
        raise SvdqError(f"--size {settings.budget_bytes:,} bytes compresses nothing: the target "
                        f"layers take {fp16:,} bytes in float16; ask for less")


def damage_warning(works: list["LayerWork"], choices: list[Choice]) -> str | None:
    """A warning when the plan leaves layers with large predicted output errors."""
    bad = [(c.error, w.name) for w, c in zip(works, choices) if c.error > DAMAGE]
    if not bad:
        return None
    worst, name = max(bad)
    return (f"this budget leaves {len(bad)} of {len(works)} layers with a predicted relative "
            f"output error above {DAMAGE:g} (worst {worst:.2f}, {name}): expect a badly damaged "
            "model; raise the budget (--ratio/--size) and compare with svdq eval")


def budget_of(settings: Settings, fp16: int) -> int:
    if settings.budget_ratio is not None:
        return math.floor(settings.budget_ratio * fp16)
    return settings.budget_bytes


def candidates(measured: Measured, budget: int, block_size: int) -> list[tuple[str, list[int]]]:
    """Allocations of `budget` worth comparing, as (label, option index per layer), best
    estimate first: the sensitivity-optimal one under each of `ERROR_CAPS` the budget allows
    (without any cap if it allows none), then the most exact uniform quantization without
    correction that fits (every layer at the most bits, then the smallest blocks, the budget
    allows). Duplicates are dropped."""
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
    if not found:
        try:
            found.append(("no error cap", allocate(options, budget, list(measured.uniform.values()))))
        except ValueError:
            return []
    forms = {(o.bits, o.block or block_size) for o in options[0]
             if o.kind == "dense" and o.bits is not None}
    for bits, block in sorted(forms, key=lambda f: (-f[0], f[1])):  # the most exact first
        plan = [next(i for i, o in enumerate(opts) if (o.kind, o.rank, o.bits, o.block or block_size)
                     == ("dense", 0, bits, block)) for opts in options]
        if total(options, plan)[0] <= budget:
            found.append((f"{bits}-bit in blocks of {block}, no correction", plan))
            break
    unique: dict[tuple[int, ...], str] = {}
    for label, plan in found:
        unique.setdefault(tuple(plan), label)
    return [(label, list(plan)) for plan, label in unique.items()]


def build(works: list["LayerWork"], options: list[list[Option]], plan: list[int],
          settings: Settings) -> list[Choice]:
    """The stored layers of `plan` (option index per layer), corrections refined."""
    choices = []
    for work, opts, i in zip(works, options, plan):
        o = opts[i]
        ref = reference(work.w, work.bias, work.stats)
        if o.kind == "dense" and o.block is not None:  # the weight alone in its own blocks
            choices.append(stored_dense(work.w, work.stats, ref, o.bits, o.block, 0))
            continue
        residual = None
        if o.kind == "residual":  # rebuilt, not kept for every layer
            residual = residual_of(work.w, work.stats, o.bits, o.block or settings.block_size,
                                   settings.method)
        kb = k_break_of(work.w, work.factors, settings.bits, settings.block_size)
        c = choice_of(o, work.w, work.bias, work.factors, work.stats, settings.block_size, kb,
                      residual)
        choices.append(refine_residual(work.w, c, work.stats, ref, settings.method))
    return choices


def pick(works: list["LayerWork"], measured: Measured, budget: int, settings: Settings,
         judge: Callable[[list[Choice]], float] | None = None) -> tuple[list[Choice], dict]:
    """One choice per layer within `budget` bytes, and what to record about it (`weights`:
    each layer's sensitivity, in the order of `works`).

    The loss estimate behind the allocation is first-order, so with a `judge` (the calibration
    loss of a list of choices, `compress.judge_of`) every one of `candidates` is built and
    judged, and the lowest loss wins: never worse, on the calibration text, than plain
    quantization that fits the budget. Without one the best estimate is taken."""
    options, fp16 = measured.options, measured.fp16
    found = candidates(measured, budget, settings.block_size)
    if not found:
        least = sum(min(o.bytes for o in opts) for opts in options)
        raise SvdqError(f"a budget of {budget:,} bytes ({budget / fp16:.3f} × fp16) is below "
                        f"the smallest these {len(works)} layers can be stored in, {least:,} "
                        f"bytes ({least / fp16:.3f} × fp16); ask for at least that")
    if judge is None:
        found = found[:1]
    best, judged = None, []
    for label, plan in found:
        choices = build(works, options, plan, settings)
        loss = judge(choices) if judge is not None and len(found) > 1 else None
        size, planned_error2 = total(options, plan)
        judged.append({"plan": label, "bytes": size, "planned_error2": planned_error2,
                       "calibration_loss": loss})
        if best is None or (loss is not None and loss < best[0]):
            best = (loss, label, plan, choices)
    _, label, picks, choices = best
    planned, planned_cost = total(options, picks)
    weights = [opts[0].weight for opts in options]
    cost = math.fsum(wt * c.error ** 2 for wt, c in zip(weights, choices))
    weighted = any(o.weight != 1.0 for opts in options for o in opts)
    cap = next((c for c in ERROR_CAPS if label == f"error cap {c:g}"), None)
    warning = damage_warning(works, choices)
    info = {"requested_bytes": budget, "planned_bytes": planned, "target_fp16_bytes": fp16,
            **({"warning": warning} if warning else {}),
            "weights": weights, "planned_error2": planned_cost,
            "objective": "sensitivity-weighted error²" if weighted else "error²",
            "error_cap": cap, "plan": label, "candidates": judged,
            "error2": cost, "bits_choices": list(measured.bits_choices),
            "uniform": [dict(zip(("eps", "bytes", "error2"), (eps, *total(options, p))))
                        for eps, p in measured.uniform.items()]}
    return choices, info


def choose_all(works: list["LayerWork"], settings: Settings,
               report: Callable[[str, int, int], None],
               judge: Callable[[list[Choice]], float] | None = None) -> tuple[list[Choice], dict]:
    """One choice per layer within the budget of `settings`, and what to record about it."""
    measured = measure(works, settings, report)
    return pick(works, measured, budget_of(settings, measured.fp16), settings, judge)
