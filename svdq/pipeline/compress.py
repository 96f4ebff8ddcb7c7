"""`compress`: a source model in, its layers' plans and stored tensors out, block by block.

Eps mode walks the blocks once: per block, each target layer's form is chosen on its
statistics (`choose_form`), swapped into the model (so `--sequential` carries the compressed
block's outputs on) and its tensors handed to the sink. A budget walks twice
(`pipeline.budget`): pass 1 keeps each layer's option table only; the allocation picks the
candidate plans; pass 2 builds every candidate's layers block by block, runs each plan's own
stream through the block, hands each candidate's tensors to a store of its own, and the judge
picks the plan whose tensors become the artifact's. `--method fisher` and budgets first take
the gradient statistics, themselves one block at a time. Nothing holds more than one block's
weights when the source streams from its files.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from svdq import runtime
from svdq.algo.quant import codebook
from svdq.algo.refit import refit_u
from svdq.algo.residual import residual_of
from svdq.algo.error import reference
from svdq.algo.search import choose, choose_residual, refined_sparse
from svdq.algo.sparse import sparse_count
from svdq.algo.stored import Stored
from svdq.models.attention import heads
from svdq.artifact.writer import TensorWriter
from svdq.config import Settings
from svdq.models.layers import set_module
from svdq.models.load import Source
from svdq.pipeline import budget as budgets, product as products
from svdq.pipeline.judge import losses
from svdq.pipeline.options import Measured, measure_layer
from svdq.models.streams import Scratch
from svdq.pipeline.inputs import calibration_ids
from svdq.pipeline.walk import (Clock, LayerWork, Progress, Walker,
                                one_input_at_a_time)
from svdq.plan import LayerPlan, Result, tensors_of



def realize(work: LayerWork, stored: Stored, settings: Settings,
            stored_dtype: torch.dtype | None = None
            ) -> tuple[LayerPlan, dict[str, torch.Tensor], nn.Module | None]:
    """Layer `work.name` stored as `stored`: its plan entry (`stored_dtype`: see
    `LayerPlan.of`), its artifact tensors and the module that computes it as the loaders will
    (None: the layer stays as it is)."""
    tensors = tensors_of(work.name, work.module, stored)
    plan = LayerPlan.of(work.name, work.module, stored, tensors, settings.block_size, stored_dtype)
    if stored.kind == "keep":
        return plan, tensors, None
    books = {runtime.codebook_key(b): codebook(b) for b in (4, 8)}
    module = runtime.build_layer(plan.to_json(), {**tensors, **books}, work.module.weight.dtype,
                                 set(), conv=runtime.conv_of(work.module))
    return plan, tensors, module.to(work.module.weight.device)


def choose_form(work: LayerWork, settings: Settings, residual=None) -> Stored:
    """The eps-mode choice for one layer: low rank replaces the weight, or with
    `settings.residual` corrects the weight's quantization error (`residual`: that error's
    factors, made here when not given)."""
    # --sparse: linear layers only (the loaders apply a sparse term to matrices, not kernels);
    # the form with the term is taken only where it stores fewer bytes at the same eps
    nnz = 0 if runtime.conv_of(work.module) else sparse_count(*work.w.shape, settings.sparse)
    if settings.residual:
        res = residual or residual_of(work.w, work.stats, settings.bits, settings.block_size,
                                      settings.method, settings.grid, settings.gptq)
        tried = [choose_residual(work.w, work.bias, res, work.stats, settings.eps,
                                 method=settings.method, sparse=n) for n in {0, nnz}]
    else:
        tried = [choose(work.w, work.bias, work.factors, work.stats, settings.eps,
                        settings.bits, settings.block_size, grid=settings.grid,
                        gptq=settings.gptq, sparse=n, method=settings.method)
                 for n in {0, nnz}]
    met = [t for t in tried if t.kind != "keep"]
    stored = min(met, key=lambda t: (t.nbytes(), t.error)) if met else tried[0]
    if stored.sparse is None:
        return stored
    return refined_sparse(work.w, stored, work.stats, reference(work.w, work.bias, work.stats),
                          settings.method, settings.gptq)


def refitted(work: LayerWork, stored: Stored, settings: Settings) -> tuple[Stored, dict]:
    """`--refit`: the stored form refit against the source, and what the manifest notes."""
    if not settings.refit:
        return stored, {}
    stored, before, after = refit_u(work.w, work.bias, stored, work.stats)
    return stored, {"source_error": after, "source_error_before_refit": before,
                    "refit": after < before}


def codebooks(plans: list[LayerPlan]) -> dict[str, torch.Tensor]:
    """The bitsandbytes code values the plans' quantized tensors use (the integer grid needs
    none)."""
    used = {p.bits for p in plans if p.grid == "bnb"} | {p.factor_bits for p in plans}
    return {runtime.codebook_key(b): codebook(b) for b in sorted(used & {4, 8})}


class _Out:
    """Where stored tensors go: the sink (an artifact's `TensorWriter`), else kept in memory;
    a streamed block's untouched tensors follow once it is released."""

    def __init__(self, source: Source, sink: TensorWriter | None) -> None:
        self.source, self.sink, self.kept = source, sink, {}

    def __call__(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.sink is None:
            self.kept.update(tensors)
        else:
            self.sink.add(tensors)

    def released(self) -> None:
        if self.sink is not None and self.source.released:
            self.sink.add(dict(self.source.released))
            self.source.released.clear()

    def store(self, folder: Path) -> "TensorWriter | dict":
        """Somewhere a candidate plan's tensors wait for the judge: files beside the sink's,
        or memory."""
        if self.sink is None:
            return {}
        folder.mkdir(parents=True)
        return TensorWriter(folder, self.sink.shard_bytes, flush_bytes=CANDIDATE_FLUSH,
                            cast=self.sink.cast)

    def adopt(self, store: "TensorWriter | dict") -> None:
        if isinstance(store, dict):
            self(store)
        else:
            self.sink.adopt(store)


CANDIDATE_FLUSH = 16 * 2 ** 20  # a candidate's tensors waiting in memory before they go to a file


def compress(source: Source, settings: Settings, progress: Progress | None = None,
             warn: Callable[[str], None] | None = None, sink: TensorWriter | None = None,
             scratch: Path | None = None) -> Result:
    """Compress `source.model` according to `settings`; `warn` hears warnings as they arise.
    With `sink` (an artifact's tensor writer) stored tensors, and a streamed block's untouched
    ones, go there as soon as they are made instead of into `Result.tensors`. `scratch`: a
    folder for offloaded activations and candidate tensors (default: a temporary one)."""
    report = progress or (lambda stage, done, total: None)
    params = sum(p.numel() for p in source.model.parameters())
    clock, calibration = Clock(), {}
    out = _Out(source, sink)
    average = None
    if settings.budgeted:  # before minutes of calibration
        average = budgets.check_request(source.model, settings)
    if settings.attention_product:
        products.check(source.model)
    gpu = torch.device(settings.device)
    ids = calibration_ids(source, settings, report, calibration, warn)  # refuses cuda without one
    if gpu.type == "cuda":
        torch.cuda.reset_peak_memory_stats(gpu)
    with Scratch(scratch) as room:
        walker = Walker(source, settings, report, clock, room.path)
        try:
            if settings.budgeted:
                plans, budget = _budget(walker, ids, settings, out, room.path, average)
            else:
                plans, budget = _eps(walker, ids, settings, out), None
            walker.outside(True)  # the writer stores them
        finally:
            walker.close()
    out(codebooks(plans))
    return Result(source.model, [p.to_json() for p in plans], out.kept, calibration, params,
                  dict(clock.spent), budget=budget, released=source.released,
                  planned={p.name for p in plans}, device=_device(gpu))


def _device(device: torch.device) -> dict:
    """Where the heavy work ran, for the manifest; on a GPU also the peak memory it held."""
    if device.type != "cuda":
        return {"type": device.type}
    return {"type": "cuda", "name": torch.cuda.get_device_name(device),
            "peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2 ** 20)}


def _eps(walker: Walker, ids: torch.Tensor, settings: Settings, out: _Out) -> list[LayerPlan]:
    if settings.method == "fisher":
        walker.gradients(ids, fisher=True)
    walker.start(ids)
    plans = []
    n = len(walker.blocks)
    for i in range(n + 1):  # the blocks, then the head's --include'd layers
        works = walker.enter(i) if i < n else walker.enter_head()
        paired = {}
        if settings.attention_product and i < n:
            walker.report(f"blocks: block {i + 1}: attention product", i, n)
            paired = products.plan_block(works, settings, heads(walker.model), choose_form)
        for work in one_input_at_a_time(works):
            where = f"block {i + 1}" if i < n else "head"
            walker.report(f"blocks: {where}: {work.name.rpartition('.')[2]}", i, n)
            stored, notes = paired.pop(work.name, None) or refitted(
                work, choose_form(work, settings), settings)
            plan, tensors, module = realize(work, stored, settings, walker.source.stored_dtype)
            if module is not None:
                set_module(walker.model, work.name, module)
            plans.append(plan.noted(**notes))
            out(tensors)
            walker.clock.lap("rank search and quantization")
        if i < n:
            walker.leave(i, keep=walker.source.released)
            out.released()
    return plans


def _budget(walker: Walker, ids: torch.Tensor, settings: Settings, out: _Out,
            scratch: Path, average: float) -> tuple[list[LayerPlan], dict]:
    walker.gradients(ids, fisher=settings.method == "fisher")
    walker.start(ids)  # pass 1: each layer's options, numbers only
    layers, names = [], []
    blocks = len(walker.blocks)
    for i in range(blocks + 1):  # the blocks, then the head's --include'd layers
        for work in one_input_at_a_time(walker.enter(i) if i < blocks else walker.enter_head()):
            where = f"block {i + 1}" if i < blocks else "head"
            walker.report(f"blocks: {where}: options of {work.name.rpartition('.')[2]}",
                          i, blocks)
            layers.append(measure_layer(work, settings, (average, average),
                                        walker.source.stored_dtype))
            names.append(work.name)
            walker.clock.lap("options")
        if i < blocks:
            walker.leave(i)
    measured = Measured.of(layers, settings)
    limit = budgets.budget_of(settings, measured.fp16)
    found = budgets.candidates(measured, limit, settings.block_size)
    budgets.check_fits(found, measured, limit)
    product = None  # --attention-product: the best estimate with the product where it fits
    if settings.attention_product:
        product = f"{found[0][0]} + attention product"
        found.append((product, found[0][1]))
    index = {name: n for n, name in enumerate(names)}
    walker.clock.lap("allocation")
    labels = [label for label, _ in found]
    judged = len(found) > 1
    weights = [opts[0].weight for opts in measured.options]
    stores = {label: out.store(scratch / f"candidate-{k}") for k, label in enumerate(labels)}
    plans: dict[str, list[LayerPlan]] = {label: [] for label in labels}
    errors: dict[str, list[float]] = {label: [] for label in labels}
    walker.start(ids, variants=tuple(labels) if judged else ())  # pass 2: build, run, judge
    n = 0
    for i in range(blocks + 1):
        swaps: dict[str, dict[str, nn.Module]] = {label: {} for label in labels}
        works = walker.enter(i) if i < blocks else walker.enter_head()
        paired = {} if product is None or i == blocks else products.fit_block(
            works, heads(walker.model), _room(works, index, measured, found[0][1]), settings)
        for work in one_input_at_a_time(works):
            where = f"block {i + 1}" if i < blocks else "head"
            walker.report(f"blocks: {where}: plans of {work.name.rpartition('.')[2]}",
                          i, blocks)
            picks = {label: chosen[n] for label, chosen in found}
            special = {product: paired.pop(work.name)} if work.name in paired else {}
            each = _layer_of_each(work, {k: v for k, v in picks.items() if k not in special},
                                  measured.options[n], settings, walker.source.stored_dtype)
            for label, (stored, notes) in special.items():
                plan, tensors, module = realize(work, stored, settings,
                                                walker.source.stored_dtype)
                each[label] = (plan.noted(**notes), tensors, module, stored.error)
            for label, (plan, tensors, module, error) in each.items():
                plans[label].append(plan.noted(sensitivity=weights[n]))
                errors[label].append(error)
                _put(stores[label], tensors)
                if module is not None:
                    swaps[label][work.name] = module
            n += 1
            walker.clock.lap("plans")
        if not judged:  # the one plan is the model's now
            for name, module in swaps[labels[0]].items():
                set_module(walker.model, name, module)
        if i == blocks:  # the head's layers: swapped in as each plan is judged
            head = swaps
            break
        walker.leave(i, variants=swaps if judged else None, keep=walker.source.released)
        out.released()
        walker.clock.lap("plans")
    scores = [None] * len(found)
    if judged:
        walker.report("judging the candidate plans", 0, 1)
        walker.outside(True)
        by = losses(walker.model, walker.variants, ids, walker.source.is_causal, walker.main,
                    head if judged else None)
        scores = [by[label] for label in labels]
        walker.clock.lap("judge")
    best = min(range(len(found)), key=lambda k: (scores[k] is None, scores[k] or 0.0, k))
    winner = labels[best]
    out.adopt(stores[winner])
    if judged and not walker.streamed and out.sink is None:  # the model, as the winner has it
        books = codebooks(plans[winner])
        for plan in plans[winner]:
            if plan.kind != "keep":
                module = walker.model.get_submodule(plan.name)
                new = runtime.build_layer(plan.to_json(), {**out.kept, **books},
                                          module.weight.dtype, set(),
                                          conv=runtime.conv_of(module))
                set_module(walker.model, plan.name, new.to(module.weight.device))
    info = budgets.summary(measured, limit, found, scores, best, errors[winner],
                           [p.name for p in plans[winner]])
    info["achieved_bytes"] = sum(p.bytes for p in plans[winner])
    for entry, label in zip(info["candidates"], labels):  # as built (a product stores fewer)
        entry["bytes"] = sum(p.bytes for p in plans[label])
    if settings.refit:  # the refit changed the errors the allocation planned with
        info["error2"] = math.fsum(p.notes["sensitivity"] * p.error ** 2 for p in plans[winner])
    return plans[winner], info


def _room(works: list[LayerWork], index: dict[str, int], measured: Measured,
          plan: list[int]) -> dict[str, int]:
    """What `plan` gives each of the block's layers, its bias apart: the room a product
    candidate's query and key rows must fit in."""
    room = {}
    for work in works:
        option = measured.options[index[work.name]][plan[index[work.name]]]
        bias = work.module.bias
        room[work.name] = option.bytes - (0 if bias is None else bias.numel() * bias.element_size())
    return room


def _layer_of_each(work: LayerWork, picks: dict[str, int], options: list,
                   settings: Settings, stored_dtype: torch.dtype | None = None) -> dict[str, tuple]:
    """Each candidate plan's form of one layer (`picks`: the option each plan chose): {label:
    (plan entry, tensors, the module its stream runs — the form before a refit, as the judge
    compares them — and its error)}. Plans that chose the same option share one build; a
    quantized base several of them correct is made once and freed after its last user."""
    residuals: dict = {}
    built: dict[int, tuple] = {}
    order = sorted(picks, key=lambda lb: str(budgets.base_of(options[picks[lb]], settings)))
    for j, label in enumerate(order):
        idx = picks[label]
        if idx not in built:
            stored = budgets.build_layer(work, options[idx], settings, residuals)
            final, notes = refitted(work, stored, settings)
            plan, tensors, module = realize(work, stored, settings, stored_dtype)
            if final is not stored:
                plan, tensors, _ = realize(work, final, settings, stored_dtype)
            built[idx] = (plan.noted(**notes), tensors, module, stored.error)
        base = budgets.base_of(options[idx], settings)
        if j + 1 == len(order) or budgets.base_of(options[picks[order[j + 1]]], settings) != base:
            residuals.pop(base, None)  # its last user is built: free its factors
    return {label: built[picks[label]] for label in picks}


def _put(store, tensors: dict[str, torch.Tensor]) -> None:
    if isinstance(store, dict):
        store.update(tensors)
    else:
        store.add(tensors)
