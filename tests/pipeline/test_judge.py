"""Budgets judge their candidate plans by the calibration loss: the estimate behind the
allocation is first-order, so plain quantization that fits is always among what is judged."""
from __future__ import annotations

import math

import pytest
import torch

from svdq.algo.stored import keep
from svdq.config import Settings
from svdq.models import load as hf
from svdq.algo.allocate import total
from svdq.pipeline import budget
from svdq.pipeline.compress import realize
from svdq.pipeline.judge import judge_of
from svdq.pipeline.measured import measure
from svdq.pipeline.inputs import calibration_ids
from svdq.pipeline.analyse import analyse
from svdq.pipeline.work import Clock, swapped

CALIB = dict(calib_samples=4, calib_len=32, batch_size=4)


def analysed(models, calib_file, arch="llama", ratio=0.3):
    source = hf.load_source(str(models[arch]))
    settings = Settings(budget_ratio=ratio, bits=4, method="whiten", calib=str(calib_file), **CALIB)
    info: dict = {}
    ids = calibration_ids(source, settings, lambda *a: None, info)
    works = analyse(source, settings, ids, lambda *a: None, Clock(), gradients=True)
    return source, settings, ids, works, measure(works, settings, lambda *a: None)


def test_candidates_cover_each_cap_and_plain_quantization(models, calib_file):
    source, settings, ids, works, measured = analysed(models, calib_file, ratio=0.6)
    limit = budget.budget_of(settings, measured.fp16)
    found = budget.candidates(measured, limit, settings.block_size)
    labels = [label for label, _ in found]
    assert labels[0] == "error cap 0.1"
    assert "8-bit in blocks of 64, no correction" in labels  # 0.53 × fp16 fits in 0.6
    assert not any(label.startswith("4-bit") for label in labels)  # 8 bits fit: less exact
    tight = budget.candidates(measured, math.floor(0.27 * measured.fp16), settings.block_size)
    # NF4 in blocks of 64 (4.5 bits) and int4 in groups of 64 (4.31 bits, and more on layers
    # 160 wide: their last group is short) do not fit; of what does, int4 in 128 has most bytes
    assert "int4 in groups of 128, no correction" in [label for label, _ in tight]
    assert len({tuple(plan) for _, plan in found}) == len(found)  # no duplicates
    for label, plan in found:
        opts = [measured.options[n][i] for n, i in enumerate(plan)]
        assert sum(o.bytes for o in opts) <= limit, label
        if label.startswith("error cap"):
            assert max(o.error for o in opts) <= float(label.split()[-1])
        elif label.startswith("bases of"):  # see the test below
            assert all(o.kind == "keep" or o.bits >= int(label.split()[2]) for o in opts)
        elif label.endswith("on every layer"):  # see the tests below
            assert all(o.kind == "residual" for o in opts)
        else:  # one form for every layer, no correction
            assert len({(o.kind, o.bits, o.block) for o in opts}) == 1 and opts[0].rank == 0


@pytest.mark.parametrize("ratio", [0.27, 0.3, 0.6])
def test_floored_plan_moves_the_uniform_bytes_without_lowering_any_base(models, calib_file,
                                                                      ratio):
    """The plan that keeps every weight at the uniform quantization's bits: never below them,
    within the budget, never worse than the uniform plan by the estimate, and better where
    the budget leaves room for it."""
    source, settings, ids, works, measured = analysed(models, calib_file, ratio=0.6)
    limit = math.floor(ratio * measured.fp16)
    found = budget.candidates(measured, limit, settings.block_size)
    label, plain = next((lb, p) for lb, p in found if lb.endswith("no correction"))
    bits = measured.options[0][plain[0]].bits
    (floor_label, plan), = budget.floored(measured.options, limit, bits, plain)
    assert floor_label == f"bases of {bits} bits or more, sensitivity-weighted"
    opts = [measured.options[n][i] for n, i in enumerate(plan)]
    assert all(o.kind == "keep" or (o.kind in ("dense", "residual") and o.bits >= bits)
               for o in opts)
    size, cost = total(measured.options, plan)
    plain_size, plain_cost = total(measured.options, plain)
    assert size <= limit and cost <= plain_cost
    if limit - plain_size > 0.05 * plain_size:  # room to spend: it is spent
        assert cost < plain_cost and size > plain_size


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_even_plan_corrects_every_layer_of_one_base_and_spends_the_budget(
        models, calib_file, ratio):
    """EoRA's recipe: the same base on every layer, each corrected at one rank (the largest
    that fits on every layer's grid), what is left spent on the lowest ranks first, until no
    layer's next rank fits."""
    source, settings, ids, works, measured = analysed(models, calib_file, ratio=0.6)
    limit = math.floor(ratio * measured.fp16)
    found = dict(budget.candidates(measured, limit, settings.block_size))
    plain = next(p for lb, p in found.items() if lb.endswith("no correction"))
    bits = measured.options[0][plain[0]].bits
    (label, plan), = budget.even(measured.options, limit, bits, settings.block_size)
    assert label in found and found[label] == plan
    opts = [measured.options[n][i] for n, i in enumerate(plan)]
    assert all(o.kind == "residual" and o.bits == bits for o in opts), label
    assert len({(o.block, o.grid) for o in opts}) == 1
    lo, hi = (int(x) for x in label.split("rank ")[1].split()[0].split("–"))
    assert (lo, hi) == (min(o.rank for o in opts), max(o.rank for o in opts))
    def at(layer, o, k):  # layer's option on o's base at rank k
        return next(x for x in layer if x.kind == "residual" and not x.sparse and x.rank == k
                    and (x.block, x.grid, x.bits) == (o.block, o.grid, o.bits))
    grids = [sorted(x.rank for x in layer if x.kind == "residual" and not x.sparse
                    and (x.block, x.grid, x.bits) == (o.block, o.grid, o.bits))
             for o, layer in zip(opts, measured.options)]
    size = total(measured.options, plan)[0]
    assert size <= limit
    for o, layer, grid in zip(opts, measured.options, grids):  # no layer's next rank fits
        if o.rank < grid[-1]:
            up = at(layer, o, min(k for k in grid if k > o.rank))
            assert size + up.bytes - o.bytes > limit
    # at least as even as one rank for all: each layer at or above the largest of its ranks
    # at or below the largest such rank that fits
    union = sorted({k for g in grids for k in g}, reverse=True)
    below = lambda g, r: max(k for k in g if k <= r)  # noqa: E731
    even_rank = next(r for r in union if sum(at(layer, o, below(g, r)).bytes for o, layer, g
                                             in zip(opts, measured.options, grids)) <= limit)
    assert all(o.rank >= below(g, even_rank) for o, g in zip(opts, grids))


def test_the_judge_decides_and_without_one_the_estimate_does(models, calib_file):
    source, settings, ids, works, measured = analysed(models, calib_file, ratio=0.6)
    limit = budget.budget_of(settings, measured.fp16)
    plain = "8-bit in blocks of 64, no correction"

    def prefers_plain(choices):  # a loss that only plain 8-bit everywhere makes small
        return 0.0 if all(c.kind == "dense" and c.bits == 8 and c.weight.block_size == 64
                          for c in choices) else 1.0
    choices, info = budget.pick(works, measured, limit, settings, prefers_plain)
    assert info["plan"] == plain and info["error_cap"] is None
    assert all(c.kind == "dense" and c.bits == 8 for c in choices)
    assert [c["calibration_loss"] for c in info["candidates"]].count(0.0) == 1
    _, info = budget.pick(works, measured, limit, settings)
    assert info["plan"] == "error cap 0.1" and info["candidates"][0]["calibration_loss"] is None


def test_causal_loss_is_the_mean_next_token_cross_entropy(models, calib_file):
    source, settings, ids, works, measured = analysed(models, calib_file)
    got = judge_of(source, works, ids, settings)([keep() for _ in works])
    with torch.no_grad():
        want = sum(float(source.model(input_ids=ids[i: i + 1], labels=ids[i: i + 1]).loss)
                   for i in range(ids.shape[0])) / ids.shape[0]
    assert got == pytest.approx(want, rel=1e-5)


def test_judge_swaps_plans_in_and_puts_the_source_back(models, calib_file):
    source, settings, ids, works, measured = analysed(models, calib_file, arch="bert")
    judge = judge_of(source, works, ids, settings)
    before = [source.model.get_submodule(w.name) for w in works]
    plan = [next(i for i, o in enumerate(opts) if (o.kind, o.bits, o.block) == ("dense", 4, 256))
            for opts in measured.options]
    nf4 = [budget.build_layer(w, opts[i], settings) for w, opts, i in zip(works, measured.options, plan)]
    kept = [keep() for _ in works]  # every layer as is
    assert judge(kept) == 0.0  # the encoder's loss is its distance to the source's states
    assert judge(nf4) > 0.0
    assert [source.model.get_submodule(w.name) for w in works] == before
    modules = {w.name: realize(w, s, settings)[2] for w, s in zip(works, nf4)}
    with pytest.raises(RuntimeError), swapped(source.model, modules):
        raise RuntimeError("interrupted")
    assert [source.model.get_submodule(w.name) for w in works] == before
