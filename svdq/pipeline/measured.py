"""A budget's option tables for a whole model: each layer's table (`pipeline.options`), the
choices each uniform `--eps` would make on it, and the layers' loss sensitivities, which weight
every option's error² so that one budget can be shared out across layers (`Measured`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from svdq import runtime
from svdq.algo.allocate import Option
from svdq.algo.dense import STACK, held, prequantize, release
from svdq.algo.error import output_norm2
from svdq.algo.residual import Residual, residual_of
from svdq.algo.search import factor_bits
from svdq.algo.sparse import sparse_count
from svdq.config import Settings
from svdq.pipeline import fast, probe
from svdq.pipeline.options import UNIFORM_EPS, bases, layer_options
from svdq.pipeline.work import LayerWork


@dataclass
class LayerOptions:
    """One layer's options, the option each uniform eps picks, its raw sensitivity (None
    without gradient statistics), its float16 bytes and each option's token-probe factor
    (`pipeline.probe`; None: all 1)."""

    options: list[Option]
    uniform: dict[float, int]
    sensitivity: float | None
    fp16: int
    factors: list[float] | None = None


def raw_sensitivity(work: LayerWork) -> float | None:
    """How much loss a relative output error of the layer costs, to first order: the mean
    squared loss gradient of its outputs times their energy; None without gradients."""
    if work.stats.grad2 is None:
        return None
    return (work.stats.grad2 / (work.stats.tokens * work.w.shape[0])
            * output_norm2(work.w, work.bias, work.stats))


def sensitivities(raw: list[float | None]) -> list[float]:
    """The layers' sensitivities scaled to average 1; all 1 where any is missing."""
    if any(r is None for r in raw):
        return [1.0] * len(raw)
    mean = sum(raw) / len(raw) or 1.0
    return [r / mean for r in raw]


def _uniform(options: list[Option], bits: int, eps: float) -> int:
    """What a uniform `--eps` picks on this table: the smallest low-rank option at `bits`
    meeting eps, else the weight at `bits` in the run's blocks (`--fast`: the first plain
    form at `bits`) if it does, else kept."""
    low = [i for i, o in enumerate(options) if o.kind == "lowrank" and o.bits == factor_bits(bits)
           and o.error <= eps and not o.sparse]
    if low:
        return min(low, key=lambda i: options[i].rank)
    dense = [i for i, o in enumerate(options) if o.kind == "dense" and o.bits == bits
             and not o.sparse]
    runs = [i for i in dense if options[i].block is None] or dense[:1]
    return next((i for i in runs if options[i].error <= eps), 0)


def bits_choices(settings: Settings) -> tuple[int, ...]:
    """The widths of the bitsandbytes dense and low-rank options; none with `--fast`, which
    has no low rank alone and takes `dense_forms` for its plain 8 bits."""
    if settings.fast:
        return ()
    return tuple(dict.fromkeys((factor_bits(settings.bits), 4, 8)))


def dense_forms(settings: Settings) -> list[tuple[int, int, str]]:
    """Plain forms a layer is offered beside its bases: with `--fast`, 8 bits on the integer
    grid in groups of 2 × `--block-size` instead of the bitsandbytes 8-bit blocks, which it
    dominates (SmolLM2's first two blocks by GPTQ: 8.19 bits a weight, RMS error 0.0029,
    against 8.5 bits and 0.0044; see `options.RESIDUAL_BASES`), and whose own codebook costs
    GPTQ's column loop a bucketing per column; NF4 in `--block-size` blocks neither (int4 in
    groups of 64 dominates it)."""
    return [(8, 2 * settings.block_size, "int")] if settings.fast else []


def measure_layer(work: LayerWork, settings: Settings,
                  average: tuple[float, float] | None = None,
                  stored_dtype: torch.dtype | None = None,
                  made: dict | None = None, peers: list[LayerWork] = ()) -> LayerOptions:
    """Every option of one layer, corrected forms included (the allocator decides where a
    correction pays), and what each uniform eps would choose; nothing of their tensors.
    `average`: the bits per weight of the budgets asked for (`bases`); `stored_dtype`: what a
    kept weight and a bias are stored in where it is not the model's dtype. `made`: filled
    with what pass 2 would make again (`kept.Kept.put_bases`): the quantized weights by grid,
    each base's `Residual`, its factors cut at the largest rank an option may take, and the
    layer's output norm.
    `peers`: the layers measured next that are fed the same inputs (k and v after q): their
    GPTQ runs in this layer's column loop where all fit in `dense.STACK` weights together."""
    grids = bases(settings, average)

    built: dict[tuple, Residual] = {}  # each base, its factors cut: for the probe and pass 2

    def base(b: int, block: int, g: str):
        res = residual_of(work.w, work.stats, b, block, settings.method, g, settings.gptq,
                          fast.factor_dtype(settings.fast), cut=True)
        built[(b, block, g)] = res
        if made is not None:
            made.setdefault("residuals", {})[(b, block, g)] = built[(b, block, g)]
        return res
    residuals = {(b, block, g): (lambda b=b, block=block, g=g: base(b, block, g))
                 for b, block, g in grids}
    choices = bits_choices(settings)  # by GPTQ, every base and dense form in one column loop
    quantized = list(dict.fromkeys(grids + [(b, settings.block_size, "bnb") for b in choices]
                                   + dense_forms(settings)))
    if held(work.w, work.stats) is None:  # not made in an earlier peer's loop
        group = [work] + [p for p in peers if p.stats.cache is work.stats.cache]
        if sum(p.module.weight.numel() for p in group) * len(quantized) > STACK:
            group = [work]
        prequantize([p.w for p in group], work.stats, quantized, settings.gptq)
    # --sparse: linear layers only (the loaders apply a sparse term to matrices, not kernels)
    nnz = 0 if runtime.conv_of(work.module) else sparse_count(*work.w.shape, settings.sparse)
    opts = layer_options(work.w, work.bias, None if settings.fast else work.factors,
                         work.stats, choices,
                         settings.block_size,
                         elsize=(stored_dtype or work.module.weight.dtype).itemsize,
                         residuals=residuals, closed=settings.method == "whiten",
                         gptq=settings.gptq, sparse=nnz, method=settings.method,
                         dense=dense_forms(settings))
    factors = probe.factors(work, opts, settings, built)
    built.clear()
    quantized = release(work.w, work.stats)
    if made is not None and quantized is not None:
        made["quantized"] = quantized
    if made is not None:
        made["output_norm2"] = output_norm2(work.w, work.bias, work.stats)
    uniform = {eps: _uniform(opts, settings.bits, eps) for eps in UNIFORM_EPS}
    fp16 = 2 * (work.w.numel() + (0 if work.bias is None else work.bias.numel()))
    return LayerOptions(opts, uniform, raw_sensitivity(work), fp16, factors)


@dataclass
class Measured:
    """Every layer's options, weighted, and the uniform-eps allocations: what any budget needs."""

    options: list[list[Option]]
    uniform: dict[float, list[int]]
    bits_choices: tuple[int, ...]
    fp16: int

    @classmethod
    def of(cls, layers: list[LayerOptions], settings: Settings) -> "Measured":
        """Options weighted by each layer's sensitivity scaled to average 1 (all 1 where
        a layer has no gradient statistics), times each option's probe factor."""
        weights = sensitivities([lo.sensitivity for lo in layers])
        options = [[replace(o, weight=wt * f) for o, f in
                    zip(lo.options, lo.factors or [1.0] * len(lo.options))]
                   for lo, wt in zip(layers, weights)]
        uniform = {eps: [lo.uniform[eps] for lo in layers] for eps in UNIFORM_EPS}
        return cls(options, uniform, bits_choices(settings), sum(lo.fp16 for lo in layers))


def measure(works: list[LayerWork], settings: Settings,
            report: Callable[[str, int, int], None],
            average: tuple[float, float] | None = None) -> Measured:
    """`measure_layer` for layers already walked (sweep, tests)."""
    layers = []
    for n, work in enumerate(works):
        report("budget: options per layer", n, len(works))
        layers.append(measure_layer(work, settings, average))
    report("budget: options per layer", len(works), len(works))
    return Measured.of(layers, settings)
