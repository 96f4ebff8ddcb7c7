"""`svdq compress --ratio R | --size S`: one byte budget for all target layers together.

Every layer's options (`algo.allocate.layer_options`: kept as is; dense and low-rank at a grid
of ranks, at `--bits`, 4 and 8 bits) are measured on its calibration statistics, together with
the choices a uniform `--eps` would make at a few eps values; `allocate` then picks one option
per layer for the least Σ error² within the budget — never worse than any of those uniform
settings that fits. The chosen forms are rebuilt (deterministically) for the artifact.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

from svdq.algo.allocate import Option, allocate, choice_of, k_break_of, layer_options, total
from svdq.algo.quant import nbytes
from svdq.algo.search import Choice, choose, lowrank_bytes
from svdq.config import Settings
from svdq.errors import SvdqError

if TYPE_CHECKING:
    from svdq.compress import LayerWork

UNIFORM_EPS = (0.02, 0.05, 0.1, 0.2, 0.3)  # the per-layer eps settings the result must beat


def fp16_bytes(work: "LayerWork") -> int:
    return 2 * (work.w.numel() + (0 if work.bias is None else work.bias.numel()))


def _option(choice: Choice, work: "LayerWork", options: list[Option], block_size: int) -> int:
    """The index of `choice` among `options`, appended there if it is not one of them."""
    for i, o in enumerate(options):
        if (o.kind, o.rank, o.bits) == (choice.kind, choice.rank, choice.bits):
            return i
    bias = 0 if work.bias is None else work.bias.numel() * work.module.weight.element_size()
    if choice.kind == "lowrank":
        size = lowrank_bytes(*work.w.shape, choice.rank, choice.bits, block_size)
    else:  # quantized dense: the kept-as-is option is always there
        size = nbytes(work.w.numel(), choice.bits, block_size)
    options.append(Option(size + bias, choice.error, choice.kind, choice.rank, choice.bits))
    return len(options) - 1


def choose_all(works: list["LayerWork"], settings: Settings,
               report: Callable[[str, int, int], None]) -> tuple[list[Choice], dict]:
    """One choice per layer within the budget of `settings`, and what to record about it."""
    fp16 = sum(fp16_bytes(w) for w in works)
    if settings.budget_ratio is not None:
        budget = math.floor(settings.budget_ratio * fp16)
    else:
        budget = settings.budget_bytes
    bits_choices = tuple(dict.fromkeys((settings.bits, 4, 8)))
    options, uniform = [], {eps: [] for eps in UNIFORM_EPS}
    for n, work in enumerate(works):
        report("budget: options per layer", n, len(works))
        cache: dict = {}  # stored forms measured for this layer, shared by all the calls below
        opts = layer_options(work.w, work.bias, work.factors, work.stats, bits_choices,
                             settings.block_size, elsize=work.module.weight.element_size(),
                             cache=cache)
        for eps in UNIFORM_EPS:
            c = choose(work.w, work.bias, work.factors, work.stats, eps, settings.bits,
                       settings.block_size, cache=cache)
            uniform[eps].append(_option(c, work, opts, settings.block_size))
        options.append(opts)
    report("budget: options per layer", len(works), len(works))
    try:
        picks = allocate(options, budget, list(uniform.values()))
    except ValueError:
        least = sum(min(o.bytes for o in opts) for opts in options)
        raise SvdqError(f"a budget of {budget:,} bytes ({budget / fp16:.3f} × fp16) is below the "
                        f"smallest these {len(works)} layers can be stored in, {least:,} bytes "
                        f"({least / fp16:.3f} × fp16); ask for at least that") from None
    choices = []
    for work, opts, i in zip(works, options, picks):
        kb = k_break_of(work.w, work.factors, settings.bits, settings.block_size)
        choices.append(choice_of(opts[i], work.w, work.bias, work.factors, work.stats,
                                 settings.block_size, kb))
    planned, error2 = total(options, picks)
    info = {"requested_bytes": budget, "planned_bytes": planned, "target_fp16_bytes": fp16,
            "error2": error2, "bits_choices": list(bits_choices),
            "uniform": [dict(zip(("eps", "bytes", "error2"), (eps, *total(options, p))))
                        for eps, p in uniform.items()]}
    return choices, info
