"""`compress`: a source model in, its layers' plans and stored tensors out, block by block.

Eps mode walks the blocks once: per block, each target layer's form is chosen on its
statistics (`choose_form`), swapped into the model (so `--sequential` carries the compressed
block's outputs on) and its tensors handed to the sink. A budget walks twice
(`pipeline.two_pass`): pass 1 keeps each layer's option table only; pass 2 builds and judges
the candidate plans. `--method fisher` and budgets first take
the gradient statistics, themselves one block at a time. Nothing holds more than one block's
weights when the source streams from its files.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from svdq.algo.error import products_in
from svdq.artifact.writer import TensorWriter
from svdq.config import Settings
from svdq.models.attention import heads
from svdq.models.layers import set_module
from svdq.models.load import Source
from svdq.models.streams import Scratch
from svdq.pipeline import budget as budgets, embedding as embeddings, fast, product as products, two_pass
from svdq.pipeline.forms import choose_form, codebooks, realize, refitted  # noqa: F401 (re-exported)
from svdq.pipeline.inputs import calibration_ids
from svdq.pipeline.walk import Walker
from svdq.pipeline.work import Clock, Progress, one_input_at_a_time
from svdq.plan import LayerPlan, Result



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
    taken = embeddings.planned_names(source.model, settings)  # refuses a model without one
    if settings.budget_scope == "all":  # the layers get what the rest of the checkpoint leaves
        settings = replace(settings, budget_ratio=None, budget_bytes=embeddings.layers_budget(
            source.model, settings, source.stored_dtype))
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
            if settings.budgeted:  # --fast: the error forms' products in float32 too
                with products_in(fast.factor_dtype(settings.fast)):
                    plans, budget = two_pass.walk(walker, ids, settings, out, room.path, average)
            else:
                plans, budget = _eps(walker, ids, settings, out), None
            walker.outside(True)  # the writer stores them
        finally:
            walker.close()
    out(codebooks(plans))
    if taken:
        report("embedding", 0, 1)
        plan, tensors = embeddings.quantize_embedding(source.model, settings, source.stored_dtype)
        out({k: t.cpu() for k, t in tensors.items()})
        plans.append(plan)
        clock.lap("embedding")
    return Result(source.model, [p.to_json() for p in plans], out.kept, calibration, params,
                  dict(clock.spent), budget=budget, released=source.released,
                  planned={p.name for p in plans} | taken, device=_device(gpu))


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
