"""A budget's walk (`--ratio`/`--size`), in two passes over the blocks.

Pass 1 keeps each layer's option table only (`pipeline.options`); the allocation picks the
candidate plans (`pipeline.budget`); pass 2 builds every candidate's layers block by block,
runs each plan's own stream through the block, hands each candidate's tensors to a store of
its own, and the judge (`pipeline.judge.losses`) picks the plan whose tensors become the
artifact's. With `--attention-product` one more candidate is the best estimate's plan with
each query/key pair stored as the product that fits in the pair's bytes (`product.fit_block`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from svdq import runtime
from svdq.algo.dense import hold, prequantize, release
from svdq.algo.error import known_output_norm2, reference
from svdq.algo.residual import ROUNDS, known, refine_residuals
from svdq.algo.stored import Stored
from svdq.calibration.loss import native_bf16
from svdq.config import Settings
from svdq.models.attention import heads
from svdq.models.layers import set_module
from svdq.models.stream import give_back
from svdq.pipeline import budget as budgets, fast, probe, product as products
from svdq.pipeline.forms import codebooks, realize, refitted
from svdq.pipeline.judge import losses
from svdq.pipeline.kept import Kept, keeps
from svdq.pipeline.measured import Measured, measure_layer
from svdq.pipeline.options import bases
from svdq.pipeline.walk import Walker
from svdq.pipeline.work import LayerWork, one_input_at_a_time
from svdq.plan import LayerPlan

if TYPE_CHECKING:
    from svdq.pipeline.compress import _Out


def walk(walker: Walker, ids: torch.Tensor, settings: Settings, out: "_Out",
            scratch: Path, average: float) -> tuple[list[LayerPlan], dict]:
    few = (fast.samples(len(ids), fast.GRADIENT_SHARE, fast.GRADIENT_LEAST) if settings.fast
           else len(ids))
    probe.gradients(walker, ids[:few], settings.method == "fisher", len(ids) / few)
    walker.start(ids)  # pass 1: each layer's options, numbers only
    layers, names = [], []
    blocks = len(walker.blocks)
    kept = Kept(scratch if keeps(settings) else None, device=walker.device)
    for i in range(blocks + 1):  # the blocks, then the head's --include'd layers
        works = walker.enter(i) if i < blocks else walker.enter_head()
        kept.put(i, works)
        for j, work in enumerate(one_input_at_a_time(works)):
            where = f"block {i + 1}" if i < blocks else "head"
            walker.report(f"blocks: {where}: options of {work.name.rpartition('.')[2]}",
                          i, blocks)
            made = {} if kept.on else None  # what pass 2 would make again: kept for it
            layers.append(measure_layer(work, settings, (average, average),
                                        walker.source.stored_dtype, made,
                                        works[j + 1:]))
            kept.put_bases(len(names), made)
            names.append(work.name)
            walker.clock.lap("options")
        if i < blocks:
            walker.leave(i)
    measured = Measured.of(layers, settings)
    limit = budgets.budget_of(settings, measured.fp16)
    found = budgets.candidates(measured, limit, settings.block_size, settings.fast)
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
    # --sequential: each candidate's layers are built on its own stream's statistics (what its
    # compressed blocks so far produce), as llm-compressor's sequential GPTQ calibrates; the
    # main stream is then read only as the encoders' reference and --refit's source side
    own = settings.sequential and judged
    causal = walker.source.is_causal  # its judge reads no main stream; an encoder's does
    # --fast: the judge scores some sequences. On pass 1's statistics (kept) the streams exist
    # only for the judge, so pass 2 captures just those, in batches of their own; --sequential's
    # streams calibrate their candidates too: they carry every sequence, the head scores some
    scored = fast.samples(len(ids)) if settings.fast else len(ids)
    walker.start(ids[:scored] if kept.on else ids,  # pass 2: build, run, judge
                 variants=tuple(labels) if judged else (),
                 main=judged and not causal if kept.on else not own or settings.refit or not causal)
    n = 0
    for i in range(blocks + 1):
        swaps: dict[str, dict[str, nn.Module]] = {label: {} for label in labels}
        where = f"block {i + 1}" if i < blocks else "head"
        for members in ([[label] for label in labels] if own else [labels]):
            mine = members[0] if own else None
            works = (walker.enter(i, mine, kept.get(i)) if i < blocks
                     else walker.enter_head(mine, kept.get(i)))
            paired = {} if product not in members or i == blocks else products.fit_block(
                works, heads(walker.model), _room(works, index, measured, found[0][1]), settings)
            for j, work in enumerate(one_input_at_a_time(works)):
                walker.report(f"blocks: {where}: plans of {work.name.rpartition('.')[2]}"
                              + (f" ({mine})" if own else ""), i, blocks)
                picks = {label: chosen[n + j] for label, chosen in found if label in members}
                special = {product: paired.pop(work.name)} if work.name in paired else {}
                each = _layer_of_each(work, {k: v for k, v in picks.items() if k not in special},
                                      measured.options[n + j], settings,
                                      walker.source.stored_dtype, kept.bases(n + j))
                for label, (stored, notes) in special.items():
                    plan, tensors, module = realize(work, stored, settings,
                                                    walker.source.stored_dtype)
                    each[label] = (plan.noted(**notes), tensors, module, stored.error)
                for label, (plan, tensors, module, error) in each.items():
                    factor = (measured.options[n + j][picks[label]].weight / weights[n + j]
                              if label in picks and weights[n + j] else 1.0)
                    plans[label].append(plan.noted(sensitivity=weights[n + j],
                                                   token_factor=factor))
                    errors[label].append(error)
                    _put(stores[label], tensors)
                    if module is not None:
                        swaps[label][work.name] = module
                walker.clock.lap("plans")
        n += len(works)
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
        by = losses(walker.model, walker.variants, ids[:scored], walker.source.is_causal,
                    walker.main, head if judged else None,
                    bf16=settings.fast and native_bf16(walker.device))
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
    info["token_weighted_layers"] = len(set(walker.weights) & set(names))  # `probe.WEIGHED`
    if settings.fast:  # what the quicker search saw
        info["fast"] = {"gradient_samples": few, "judged_samples": scored if judged else 0,
                        "bases": [list(b) for b in bases(settings, (average, average))]}
    for entry, label in zip(info["candidates"], labels):  # as built (a product stores fewer)
        entry["bytes"] = sum(p.bytes for p in plans[label])
    if settings.refit:  # the refit changed the errors the allocation planned with
        info["error2"] = math.fsum(p.notes["sensitivity"] * p.notes["token_factor"] * p.error ** 2
                                   for p in plans[winner])
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
                   settings: Settings, stored_dtype: torch.dtype | None = None,
                   held: dict | None = None) -> dict[str, tuple]:
    """Each candidate plan's form of one layer (`picks`: the option each plan chose): {label:
    (plan entry, tensors, the module its stream runs — the form before a refit, as the judge
    compares them — and its error)}. Plans that chose the same option share one build; a
    quantized base several of them correct is made once and freed after its last user; the
    corrections are refined together (`residual.refine_residuals`). `held`: what pass 1 made
    of this layer (`kept.Kept.bases`), the same numbers, taken instead of made again."""
    residuals: dict = {key: known(work.w, res, work.stats)  # pass 1 made them of this weight
                       for key, res in held.get("residuals", {}).items()} if held else {}
    if held and "output_norm2" in held:  # and measured its output on these statistics
        known_output_norm2(work.w, work.bias, work.stats, held["output_norm2"])
    built: dict[int, Stored] = {}
    if held and "quantized" in held:
        hold(work.w, work.stats, held["quantized"])
    else:
        prequantize(work.w, work.stats, [(o.bits, o.block or settings.block_size, o.grid)
                                         for o in (options[i] for i in picks.values())
                                         if o.kind in ("dense", "residual")], settings.gptq)
    order = sorted(picks, key=lambda lb: str(budgets.base_of(options[picks[lb]], settings)))
    for j, label in enumerate(order):
        idx = picks[label]
        if idx not in built:  # a sparse term follows its own refit: built whole
            built[idx] = budgets.build_layer(work, options[idx], settings, residuals,
                                             refine=bool(options[idx].sparse))
        base = budgets.base_of(options[idx], settings)
        if j + 1 == len(order) or budgets.base_of(options[picks[order[j + 1]]], settings) != base:
            residuals.pop(base, None)  # its last user is built: free its factors
        give_back()  # the heap's free pages: a budget's peak lies in these builds
    release(work.w, work.stats)
    plain = [i for i in built if not options[i].sparse]
    ref = reference(work.w, work.bias, work.stats)
    built.update(zip(plain, refine_residuals(work.w, [built[i] for i in plain], work.stats, ref,
                                             settings.method, fast.ROUNDS if settings.fast else ROUNDS,
                                             settings.gptq, fast.factor_dtype(settings.fast))))
    give_back()
    out: dict[int, tuple] = {}
    for idx, stored in built.items():
        final, notes = refitted(work, stored, settings)
        plan, tensors, module = realize(work, stored, settings, stored_dtype)
        if final is not stored:
            plan, tensors, _ = realize(work, final, settings, stored_dtype)
        out[idx] = (plan.noted(**notes), tensors, module, stored.error)
    return {label: out[picks[label]] for label in picks}


def _put(store, tensors: dict[str, torch.Tensor]) -> None:
    if isinstance(store, dict):
        store.update(tensors)
    else:
        store.add(tensors)
