"""A budget's per-layer options: every stored form worth considering, with its exact bytes
and its error as stored — measured one layer at a time, keeping numbers, not tensors.

Per layer (`measure_layer`): kept as is; per bit width of `--bits`, 4 and 8: dense, and low
rank at about 12 ranks up to the break-even rank; per base of `RESIDUAL_BASES`: the weight
quantized there plus a correction of its error at about 12 ranks (at a block size other than
`--block-size`, the weight alone too); and the choices a uniform `--eps` of `UNIFORM_EPS` would
make. Each option's weight is the layer's loss sensitivity (`sensitivities`), once every
layer is measured.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from svdq.algo.allocate import Option
from svdq.algo.dense import stored_dense
from svdq.algo.error import output_norm2, reference
from svdq.algo.factorize import Factors, LayerStats
from svdq.algo.lowrank import break_even_rank, k_break_of, lowrank_bytes, stored_lowrank
from svdq.algo.quant import nbytes
from svdq.algo.residual import Residual, residual_bytes, residual_of, stored_residual
from svdq.algo.search import choose
from svdq.algo.stored import Stored, keep
from svdq.config import Settings
from svdq.pipeline.walk import LayerWork

UNIFORM_EPS = (0.02, 0.05, 0.1, 0.2, 0.3)  # the per-layer eps settings the result must beat
# The weights a low-rank correction is offered on: (bits, block size as a multiple of
# --block-size). Both precisions also in blocks 4× larger: a quarter of the scales, which pays
# for corrections where they matter most. At 8 bits this is what lets a budget of 8-bit's own
# bytes beat it without 4-bit layers (MiniLM at 0.534 × fp16: 0.99979 against 8-bit's 0.99972;
# 0.9991 without these blocks).
RESIDUAL_BASES = ((4, 1), (4, 4), (8, 1), (8, 4))


def rank_grid(k_break: int, n: int = 12) -> list[int]:
    """About `n` ranks spaced geometrically from 1 to `k_break`, both included."""
    if k_break <= n:
        return list(range(1, k_break + 1))
    return sorted({max(1, round(k_break ** (i / (n - 1)))) for i in range(n)} | {k_break})


class Errors(dict):
    """A cache of stored forms that keeps only what they are, not their tensors: measuring
    some 80 forms of a layer must not hold 80 copies of it."""

    def __setitem__(self, key, stored: Stored) -> None:
        super().__setitem__(key, replace(stored, u=None, s=None, v=None, weight=None))


def layer_options(w: torch.Tensor, bias: torch.Tensor | None, factors: Factors,
                  stats: LayerStats, bits_choices: Sequence[int], block_size: int,
                  ranks: Sequence[int] | None = None, elsize: int = 2,
                  cache: dict | None = None,
                  residuals: dict[tuple[int, int], Residual | Callable[[], Residual]] | None = None,
                  weight: float = 1.0) -> list[Option]:
    """Kept as is (`elsize` bytes per source element, weight and bias), then per bits: dense, and
    low-rank at each rank of `ranks` (None: `rank_grid`) up to that bits' break-even rank; per
    entry of `residuals` ({(bits, block): Residual, or a function making it — made, measured
    and dropped one at a time}), the weight at those bits plus a correction at each rank of the
    grid up to `residual_break_rank`; a block size other than `block_size` also adds the
    weight alone at that block size (fewer scales: cheaper, a little less exact). Every option
    carries `weight`. Errors are `search.choose`'s; `cache` may be shared with `choose` calls."""
    out_f, in_f = w.shape
    bias_bytes = 0 if bias is None else bias.numel() * elsize
    ref = reference(w, bias, stats)
    cache = Errors() if cache is None else cache

    def grid(kb: int) -> list[int]:
        return rank_grid(kb) if ranks is None else sorted({r for r in ranks if 1 <= r <= kb})

    options = [Option((w.numel() * elsize) + bias_bytes, 0.0, "keep", 0, None, weight)]
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
        res = res() if callable(res) else res
        tag = None if block == block_size else block
        if tag is not None:  # the weight alone at this block size: rank 0
            key = ("dense", bits, 0, block)
            cache[key] = cache.get(key) or stored_residual(w, res, stats, ref, 0, 0)
            options.append(Option(nbytes(w.numel(), bits, block) + bias_bytes, cache[key].error,
                                  "dense", 0, bits, weight, tag))
        kb = res.k_break(out_f, in_f)
        for k in grid(kb):
            key = ("residual", bits, k, block)
            cache[key] = cache.get(key) or stored_residual(w, res, stats, ref, k, kb)
            options.append(Option(residual_bytes(out_f, in_f, k, bits, block) + bias_bytes,
                                  cache[key].error, "residual", k, bits, weight, tag))
        del res
    return options


def stored_of(option: Option, w: torch.Tensor, bias: torch.Tensor | None,
              factors: Factors | None, stats: LayerStats, block_size: int, k_break: int,
              residual: Residual | None = None) -> Stored:
    """The stored layer of `option`, rebuilt (deterministic: the same tensors and error);
    `k_break` is what a kept-as-is layer records; a low-rank option needs the `factors`, a
    residual option, or a dense one at its own block size, its `residual` (the weight
    quantized at its bits and block size)."""
    ref = reference(w, bias, stats)
    if option.kind == "residual" or option.block is not None:
        block = option.block or block_size
        if residual is None or (residual.weight.bits, residual.weight.block_size) != (option.bits, block):
            raise ValueError(f"a residual option at {option.bits} bits, block {block}, needs "
                             "its Residual")
        return stored_residual(w, residual, stats, ref, option.rank, residual.k_break(*w.shape))
    if option.kind == "lowrank":
        kb = k_break_of(w, factors, option.bits, block_size)
        return stored_lowrank(w, factors, stats, ref, option.rank, option.bits, block_size, kb)
    if option.kind == "dense":  # k_break as the factors would bound it: every method's hold min(out, in)
        return stored_dense(w, stats, ref, option.bits, block_size,
                            break_even_rank(*w.shape, option.bits, block_size))
    return keep(k_break)


@dataclass
class LayerOptions:
    """One layer's options, the option each uniform eps picks, its raw sensitivity (None
    without gradient statistics) and its float16 bytes."""

    options: list[Option]
    uniform: dict[float, int]
    sensitivity: float | None
    fp16: int


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


def _index(stored: Stored, work: LayerWork, options: list[Option], block_size: int) -> int:
    """The index of `stored` among `options`, appended there if it is not one of them."""
    for i, o in enumerate(options):
        if (o.kind, o.rank, o.bits, o.block) == (stored.kind, stored.rank, stored.bits, None):
            return i
    bias = 0 if work.bias is None else work.bias.numel() * work.module.weight.element_size()
    if stored.kind == "lowrank":
        size = lowrank_bytes(*work.w.shape, stored.rank, stored.bits, block_size)
    else:  # quantized dense: the kept-as-is option is always there
        size = nbytes(work.w.numel(), stored.bits, block_size)
    options.append(Option(size + bias, stored.error, stored.kind, stored.rank, stored.bits))
    return len(options) - 1


def bits_choices(settings: Settings) -> tuple[int, ...]:
    return tuple(dict.fromkeys((settings.bits, 4, 8)))


def measure_layer(work: LayerWork, settings: Settings) -> LayerOptions:
    """Every option of one layer, residual forms included (the allocator decides where a
    correction pays), and what each uniform eps would choose; nothing of their tensors."""
    cache = Errors()  # stored forms measured for this layer, shared by all the calls below
    block = settings.block_size
    residuals = {(b, m * block): (lambda b=b, m=m: residual_of(work.w, work.stats, b, m * block,
                                                               settings.method))
                 for b, m in RESIDUAL_BASES}
    opts = layer_options(work.w, work.bias, work.factors, work.stats, bits_choices(settings),
                         block, elsize=work.module.weight.element_size(), cache=cache,
                         residuals=residuals)
    uniform = {eps: _index(choose(work.w, work.bias, work.factors, work.stats, eps, settings.bits,
                                  block, cache=cache), work, opts, block)
               for eps in UNIFORM_EPS}
    fp16 = 2 * (work.w.numel() + (0 if work.bias is None else work.bias.numel()))
    return LayerOptions(opts, uniform, raw_sensitivity(work), fp16)


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
        a layer has no gradient statistics)."""
        weights = sensitivities([lo.sensitivity for lo in layers])
        options = [[replace(o, weight=wt) for o in lo.options] for lo, wt in zip(layers, weights)]
        uniform = {eps: [lo.uniform[eps] for lo in layers] for eps in UNIFORM_EPS}
        return cls(options, uniform, bits_choices(settings), sum(lo.fp16 for lo in layers))


def measure(works: list[LayerWork], settings: Settings,
            report: Callable[[str, int, int], None]) -> Measured:
    """`measure_layer` for layers already walked (sweep, tests)."""
    layers = []
    for n, work in enumerate(works):
        report("budget: options per layer", n, len(works))
        layers.append(measure_layer(work, settings))
    report("budget: options per layer", len(works), len(works))
    return Measured.of(layers, settings)
