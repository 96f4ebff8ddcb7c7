"""A layer's option table for budgets: every stored form worth considering, with its exact
bytes and its error as stored — measured one layer at a time, keeping numbers, not tensors
(`pipeline.measured` runs it on every layer and weighs the errors by sensitivity).

Per layer (`layer_options`): kept as is; per bit width of `--bits`, 4 and 8: low rank at a
grid of ranks up to the break-even rank; per quantized base (`bases`: the bitsandbytes grids
at 4 and 8 bits in blocks of `--block-size` and 4× that, the integer grid at 2, 3, 4 and 8
bits in groups of `--block-size` and 2× that; by GPTQ with `--gptq`): the weight quantized
there alone, and plus a correction of its error at a grid of ranks; with `--sparse`, some of
these also with a sparse term. `stored_of` builds an option's stored layer again.

With whitened factors (`--method whiten`, the budgets' default) nothing is built per rank:
the factorization's singular values give every rank's error before quantization in closed
form (the tail of σ²; a quantized base alone: all of its error's σ²), and the quantization
of the factors adds noise in proportion to the energy kept, measured once per bit width or
base at its largest rank (`_closed`). So a layer costs one quantization and one SVD per base,
whatever the number of ranks; pass 2 builds the chosen forms exactly and the manifest records
their exact errors.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Sequence

import torch

from svdq.algo.allocate import Option
from svdq.algo.dense import stored_dense
from svdq.algo.error import reference
from svdq.algo.factorize import Factors, LayerStats, factorize
from svdq.algo.lowrank import break_even_rank, k_break_of, lowrank_bytes, stored_lowrank
from svdq.algo.quant import weight_bytes
from svdq.algo.residual import Residual, residual_bytes, residual_of, stored_residual
from svdq.algo.search import refined_sparse
from svdq.algo.sparse import best_entries, csr_bytes, with_sparse
from svdq.algo.stored import Stored, keep
from svdq.config import Settings
from svdq.pipeline.fast import BASES as FAST_BASES

UNIFORM_EPS = (0.02, 0.05, 0.1, 0.2, 0.3)  # the per-layer eps settings the result must beat
# The weights a low-rank correction is offered on, (bits, block size as a multiple of
# --block-size, grid). The bnb grids also in blocks 4× larger: a quarter of the scales, which
# pays for corrections where they matter most (MiniLM at 0.534 × fp16: 0.99979 against 8-bit's
# 0.99972; 0.9991 without these blocks). The integer grid from 2 to 8 bits, where a correction
# of a coarse base buys the most.
# The integer grid at 4 and 8 bits dominates the bnb blocks of 64 (SmolLM2's first two
# blocks, RMS layer error by GPTQ: int4 in groups of 64, 4.31 bits/weight, 0.0426 against NF4
# in 64, 4.5 bits, 0.0428; int8 in 128, 8.21 bits, 0.0029 against 8-bit in 64, 8.5 bits,
# 0.0044; by rounding, 0.0685 against 0.0783), so those give way to it; NF4 in blocks of 256
# (4.125 bits) stays beside int4 in 128; 2 and 3 bits, where a correction buys the most.
RESIDUAL_BASES = ((2, 1, "int"), (3, 1, "int"), (3, 2, "int"), (4, 1, "int"), (4, 2, "int"),
                  (4, 4, "bnb"), (8, 2, "int"))


# `--fast` never offers int4 in groups of 2 × --block-size: NF4 in 4× blocks dominates it
# (`benchmarks/gptq/grids.py`: 0.0575 median error at 4.125 bits against 0.0580 at 4.156),
# and the nearest two would take it in NF4's place (30.54 against 30.06: RESULTS.md).


def bases(settings: Settings, average: tuple[float, float] | None = None
          ) -> list[tuple[int, int, str]]:
    """The quantized bases of a budget's options: (bits, block or group size, grid). With
    `average` (the least and most bits per weight the budgets asked for come to), those far
    from it are left out: below half the least or above 1.6 × the most (a budget of 4.3 bits
    a weight keeps 2 to 4 bits and drops int8; one of 8.5 keeps int4 in 64 and int8) — each
    base costs a quantization and an SVD per layer, and a plan mixes its neighbours."""
    chosen = [(b, m * settings.block_size, g) for b, m, g in RESIDUAL_BASES]
    if average is None:
        return chosen
    per_weight = lambda b, k, g: weight_bytes(4096, 4096, b, k, g) * 8 / 4096 ** 2  # noqa: E731
    if settings.fast:  # the nearest few, by the ratio of bits (`pipeline.fast`), of those
        offered = [c for c in chosen if c != (4, 2 * settings.block_size, "int")]
        far = lambda c: min(abs(math.log(per_weight(*c) / a)) for a in average)  # noqa: E731
        return sorted(sorted(offered, key=far)[:FAST_BASES], key=chosen.index)
    kept = [c for c in chosen if average[0] / 2 <= per_weight(*c) <= 1.6 * average[1]]
    return kept or sorted(chosen, key=lambda c: abs(per_weight(*c) - average[0]))[:2]


def rank_grid(k_break: int, n: int = 12) -> list[int]:
    """About `n` ranks spaced geometrically from 1 to `k_break`, both included."""
    if k_break <= n:
        return list(range(1, k_break + 1))
    return sorted({max(1, round(k_break ** (i / (n - 1)))) for i in range(n)} | {k_break})


class Errors(dict):
    """A cache of stored forms that keeps only what they are, not their tensors: measuring
    dozens of forms of a layer must not hold dozens of copies of it."""

    def __setitem__(self, key, stored: Stored) -> None:
        super().__setitem__(key, replace(stored, u=None, s=None, v=None, weight=None,
                                         sparse=None))


def sparse_ranks(ranks: list[int]) -> list[int]:
    """The ranks of a grid that get a sparse variant in a budget: a third of the way up, two
    thirds, and the top (each variant is built and measured: a few per form, not all)."""
    return sorted({ranks[len(ranks) // 3], ranks[2 * len(ranks) // 3], ranks[-1]}) if ranks else []


def _closed(s: torch.Tensor, total2: float, ref: float, ranks: list[int],
            exact_top: float) -> dict[int, float]:
    """Estimated stored errors at `ranks` of a whitened factorization with singular values `s`
    of a matrix whose whitened energy is `total2`: the tail Σ_{i>k} σᵢ² exactly, plus the
    factors' quantization noise in proportion to the energy kept, scaled to the exact error
    `exact_top` measured at the largest rank."""
    s2 = s.double().pow(2)
    kept = torch.cumsum(s2, 0)
    top = ranks[-1]
    tail = lambda k: max(total2 - float(kept[k - 1]), 0.0)  # noqa: E731
    noise = max((exact_top * ref) ** 2 - tail(top), 0.0) / max(float(kept[top - 1]), 1e-300)
    return {k: (tail(k) + noise * float(kept[k - 1])) ** 0.5 / ref for k in ranks}


def layer_options(w: torch.Tensor, bias: torch.Tensor | None, factors: Factors | None,
                  stats: LayerStats, bits_choices: Sequence[int], block_size: int,
                  ranks: Sequence[int] | None = None, elsize: int = 2,
                  cache: dict | None = None,
                  residuals: dict[tuple, Residual | Callable[[], Residual]] | None = None,
                  weight: float = 1.0, closed: bool = False, gptq: bool = False,
                  sparse: int = 0, method: str = "whiten",
                  dense: Sequence[tuple[int, int, str]] = ()) -> list[Option]:
    """Kept as is (`elsize` bytes per source element, weight and bias), then per bits: dense, and
    low-rank at each rank of `ranks` (None: `rank_grid`) up to that bits' break-even rank (no
    low rank alone without `factors`: `--fast`); per
    entry of `residuals` ({(bits, block[, grid]): Residual, or a function making it — made,
    measured and dropped one at a time}), the base alone and plus a correction at each rank of
    the grid up to `residual_break_rank` (a base at another block size than `block_size`, or on
    the integer grid, is the dense option of its own). Every option carries `weight`. Errors
    are `search.choose`'s, or with `closed` (whitened factors) estimated from the singular
    values (`_closed`); `cache` may be shared with `choose` calls on the layer. Dense weights
    are quantized by GPTQ with `gptq` (as the bases were, if they were). With `sparse` (a
    number of entries) each base alone and the low-rank and corrected forms at `sparse_ranks`
    also come with a sparse term of that many entries (`plus_sparse`; `method` refits the
    factors), built and measured, where it lowers their error. `dense`: more plain forms,
    (bits, block, grid), offered alone (no correction, so no SVD; `measured.dense_forms`)."""
    out_f, in_f = w.shape
    bias_bytes = 0 if bias is None else bias.numel() * elsize
    ref = reference(w, bias, stats)
    cache = Errors() if cache is None else cache

    def grid(kb: int) -> list[int]:
        return rank_grid(kb) if ranks is None else sorted({r for r in ranks if 1 <= r <= kb})

    def measured(key, make) -> float:
        if key not in cache:
            cache[key] = make()
        return cache[key].error

    options = [Option((w.numel() * elsize) + bias_bytes, 0.0, "keep", 0, None, weight)]
    extra = csr_bytes(out_f, in_f, sparse)

    fitted: dict = {}  # per family of forms: (W − S, the family refit to it), made once

    def refit_of(family: str, top: Callable[[], Stored], refit: Callable) -> tuple:
        if family not in fitted:
            wf = w.float()
            target = wf - best_entries(wf - top().dequantize(), stats.gram, sparse)
            fitted[family] = (target, refit(target))
        return fitted[family]

    def variant(option: Option, key, make, family: str, top, refit) -> None:
        """The form plus a sparse term: the better of the term on the form as it is and on the
        form rebuilt from its family's refit to W − S (`make(target, refit or None)`). A base
        and its corrections are one family: one quantization and SVD, S what its largest
        sparse form (`top()`) leaves (a GPTQ base per variant made budgets with `--sparse`
        5.8× slower on MiniLM); `top` None: the form is a family of its own. The build of a
        chosen variant refits it on its own term (`plus_sparse`)."""
        def both() -> Stored:
            form = make(w, None)
            plain = with_sparse(w, form, stats, ref, sparse)
            if top is None:  # the family is this form alone: its S is the one just chosen
                target = w.float() - plain.sparse.dense()
                again = refit(target)
            else:
                target, again = refit_of(family, top, refit)
            return min(plain, with_sparse(w, make(target, again), stats, ref, sparse),
                       key=lambda s: s.error)
        err = measured((*key, "sparse", sparse), both)
        if err < option.error:
            options.append(replace(option, bytes=option.bytes + extra, error=err, sparse=sparse))
    based = {(k[0], k[1], (*k, "bnb")[2]) for k in residuals or {}}
    for bits in dict.fromkeys(bits_choices):  # no `factors` (`--fast`): no low rank alone
        kb = break_even_rank(out_f, in_f, bits, block_size) if factors is None else k_break_of(
            w, factors, bits, block_size)
        if (bits, block_size, "bnb") not in based:  # else the base gives this dense option
            err = measured(("dense", bits, 0), lambda: stored_dense(
                w, stats, ref, bits, block_size, kb, "bnb", gptq))
            options.append(Option(weight_bytes(out_f, in_f, bits, block_size) + bias_bytes, err,
                                  "dense", 0, bits, weight))
        ks = [] if factors is None else grid(kb)
        if closed and ks:  # the whitened energy of W: all its σ² (damped root: within 1e-6)
            w_energy = float(factors.s.double().pow(2).sum())
            top = measured(("lowrank", bits, ks[-1]), lambda: stored_lowrank(
                w, factors, stats, ref, ks[-1], bits, block_size, kb))
            errs = _closed(factors.s, w_energy, ref, ks, top)
        else:
            errs = {k: measured(("lowrank", bits, k), lambda k=k: stored_lowrank(
                w, factors, stats, ref, k, bits, block_size, kb)) for k in ks}
        for k in ks:
            options.append(Option(lowrank_bytes(out_f, in_f, k, bits, block_size) + bias_bytes,
                                  errs[k], "lowrank", k, bits, weight))
            if sparse and k in sparse_ranks(ks):  # a family of its own: the spikes a rank
                make = (lambda t, f, k=k, bits=bits, kb=kb:  # leaves depend on the rank
                        stored_lowrank(t, f or factors, stats, ref, k, bits, block_size, kb))
                variant(options[-1], ("lowrank", bits, k), make, f"lowrank {bits} {k}", None,
                        lambda t: factorize(method, t, stats))
    for bits, block, g in dict.fromkeys(dense):
        if (bits, block, g) not in based:  # else its base gives this option
            err = measured(("dense", bits, 0, block, g), lambda: stored_dense(
                w, stats, ref, bits, block, 0, g, gptq))
            options.append(Option(weight_bytes(out_f, in_f, bits, block, g) + bias_bytes, err,
                                  "dense", 0, bits, weight, block, g))
    for key, res in (residuals or {}).items():
        bits, block, base_grid = (*key, "bnb")[:3]
        res = res() if callable(res) else res
        tag = None if block == block_size and base_grid == "bnb" else block
        key = ("dense", bits, 0) if tag is None else ("dense", bits, 0, block, base_grid)
        if closed and key not in cache:  # the base alone: its error's energy (else Σσ²)
            e2 = res.factors.energy
            err = (res.factors.total2() if e2 is None else max(e2, 0.0)) ** 0.5 / ref
        else:
            err = measured(key, lambda: stored_residual(w, res, stats, ref, 0, 0))
        options.append(Option(weight_bytes(out_f, in_f, bits, block, base_grid) + bias_bytes,
                              err, "dense", 0, bits, weight, tag, base_grid))
        kb = res.k_break(out_f, in_f)
        ks = grid(kb)
        if closed and ranks is None:  # closed forms cost nothing per rank: powers of two too,
            ks = sorted(set(ks) | {2 ** j for j in range(3, 13) if 2 ** j <= kb})  # (`even`)
        family = (f"base {bits} {block} {base_grid}",
                  lambda res=res, k=max(sparse_ranks(ks), default=0), kb=kb:
                  stored_residual(w, res, stats, ref, k, kb),
                  lambda t, bits=bits, block=block, g=base_grid:
                  residual_of(t, stats, bits, block, method, g, gptq, cut=True))
        if sparse:
            variant(options[-1], key, lambda t, r, res=res: stored_residual(t, r or res, stats,
                                                                            ref, 0, 0), *family)
        if closed and ks:
            e2 = res.factors.total2()
            top = measured(("residual", bits, ks[-1], block, base_grid),
                           lambda: stored_residual(w, res, stats, ref, ks[-1], kb))
            errs = _closed(res.factors.s, e2, ref, ks, top)
        else:
            errs = {k: measured(("residual", bits, k, block, base_grid),
                                lambda k=k: stored_residual(w, res, stats, ref, k, kb)) for k in ks}
        for k in ks:
            options.append(Option(residual_bytes(out_f, in_f, k, bits, block, base_grid)
                                  + bias_bytes, errs[k], "residual", k, bits, weight, tag,
                                  base_grid))
            if sparse and k in sparse_ranks(ks):
                variant(options[-1], ("residual", bits, k, block, base_grid),
                        lambda t, r, k=k, res=res, kb=kb: stored_residual(t, r or res, stats,
                                                                          ref, k, kb), *family)
    return options


def stored_of(option: Option, w: torch.Tensor, bias: torch.Tensor | None,
              factors: Factors | None, stats: LayerStats, block_size: int, k_break: int,
              residual: Residual | None = None, gptq: bool = False,
              method: str = "whiten") -> Stored:
    """The stored layer of `option`, rebuilt (deterministic: the same tensors and error);
    `k_break` is what a kept-as-is layer records; a low-rank option needs the `factors`, a
    residual option, or a dense one at its own block size or grid, its `residual` (the
    weight quantized at its bits, block size and grid). A sparse term follows the option."""
    stored = _stored_of(option, w, bias, factors, stats, block_size, k_break, residual, gptq)
    if not option.sparse:
        return stored
    return plus_sparse(w, stored, stats, reference(w, bias, stats), option.sparse, method, gptq)


def plus_sparse(w: torch.Tensor, stored: Stored, stats: LayerStats, ref: float, nnz: int,
                method: str, gptq: bool) -> Stored:
    """A budget's sparse variant of `stored`: the `nnz` most salient entries of what it
    leaves, then one round of the alternation (the form refit to W − S, S chosen again; kept
    only if it lowers the error) — one, not eps mode's two: a budget measures dozens of
    variants per layer."""
    return refined_sparse(w, with_sparse(w, stored, stats, ref, nnz), stats, ref, method, gptq,
                          rounds=1)


def _stored_of(option: Option, w: torch.Tensor, bias: torch.Tensor | None,
               factors: Factors | None, stats: LayerStats, block_size: int, k_break: int,
               residual: Residual | None = None, gptq: bool = False) -> Stored:
    ref = reference(w, bias, stats)
    if option.kind == "residual" or option.block is not None:
        block = option.block or block_size
        if residual is None or (residual.weight.bits, residual.weight.block_size,
                                residual.weight.grid) != (option.bits, block, option.grid):
            raise ValueError(f"a residual option at {option.bits} bits, block {block}, needs "
                             "its Residual")
        return stored_residual(w, residual, stats, ref, option.rank, residual.k_break(*w.shape))
    if option.kind == "lowrank":
        kb = k_break_of(w, factors, option.bits, block_size)
        return stored_lowrank(w, factors, stats, ref, option.rank, option.bits, block_size, kb)
    if option.kind == "dense":  # k_break as the factors would bound it: every method's hold min(out, in)
        return stored_dense(w, stats, ref, option.bits, block_size,
                            break_even_rank(*w.shape, option.bits, block_size), "bnb", gptq)
    return keep(k_break)
