"""Orchestration: calibrate -> factorize -> search -> quantize -> replace, block by block.

The walk captures what the first block receives, then runs the blocks one at a time on those
inputs. Per block: hooks gather the statistics of its target layers while the block runs,
then each target is factorized once, its rank searched, and the layer swapped for the module
the artifact will hold. The next block receives the outputs of the original block, or with
`--sequential` those of the block as compressed (with `--refit` the source model's stream is
carried beside it, so each low-rank U can be refit against the source layer's outputs). With a
byte budget (`--ratio`/`--size`)
every layer is walked first, then `svdq.budget` chooses all their forms together.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from svdq import calibrate, stream, surgery
from svdq.algo.factorize import Factors, LayerStats, factorize
from svdq.algo.quant import codebook
from svdq.algo.search import Choice, Residual, choose, choose_residual, refit_u, residual_of
from svdq.config import Settings
from svdq.errors import SvdqError
from svdq.hf import Source, blocks_of, weight_of
from svdq.runtime import build_layer

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class Result:
    """The compressed model (modules swapped in place), its stored tensors and its plan."""

    model: nn.Module
    layers: list[dict]
    tensors: dict[str, torch.Tensor]  # the target layers' stored tensors, by artifact key
    calibration: dict
    source_params: int  # parameters of the model before compression (tied ones once)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    notes: list[str] = field(default_factory=list)
    budget: dict | None = None  # --ratio/--size: requested, planned and achieved bytes
    released: dict[str, torch.Tensor] = field(default_factory=dict)  # streamed blocks' untouched tensors


def _stored(name: str, module: nn.Module, choice: Choice) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if choice.kind in ("lowrank", "residual"):
        out.update(choice.u.tensors(name + ".svdq.u"))
        out.update(choice.v.tensors(name + ".svdq.v"))
        out[name + ".svdq.s"] = choice.s
    if choice.kind == "residual" or (choice.kind == "dense" and choice.bits is not None):
        out.update(choice.weight.tensors(name + ".weight"))
    if module.bias is not None:
        out[name + ".bias"] = module.bias.detach().clone()
    return out


def _plan(name: str, module: nn.Module, choice: Choice, tensors: dict, settings: Settings) -> dict:
    w = weight_of(module)
    out_f, in_f = w.shape
    if choice.kind == "dense" and choice.bits is None:  # kept as is: its own tensors count
        nbytes = w.numel() * w.element_size() + (0 if module.bias is None else
                                                 module.bias.numel() * module.bias.element_size())
    else:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    fp16 = 2 * (w.numel() + (0 if module.bias is None else module.bias.numel()))
    stored = choice.weight or choice.u  # a budget may pick another block size than --block-size
    block = settings.block_size if stored is None else stored.block_size
    plan = {"name": name, "module": type(module).__name__, "out_features": out_f,
            "in_features": in_f, "bias": module.bias is not None, "kind": choice.kind,
            "rank": choice.rank, "k_break": choice.k_break, "bits": choice.bits,
            "block_size": block, "bytes": nbytes, "fp16_bytes": fp16,
            "error": choice.error}
    if choice.kind == "residual":
        plan["factor_bits"] = choice.u.bits
    return plan


class Clock:
    """Seconds spent per stage: `lap(stage)` charges the time since the previous lap."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.spent[stage] += now - self._t
        self._t = now


@dataclass
class LayerWork:
    """What choosing a layer's form needs, computed once: weight, statistics, factors."""

    name: str
    module: nn.Module  # the original layer
    w: torch.Tensor  # (out, in) float32
    bias: torch.Tensor | None
    stats: LayerStats
    factors: Factors


def calibration_ids(source: Source, settings: Settings, report: Progress,
                    calibration: dict, warn: Callable[[str], None] | None = None) -> torch.Tensor:
    """The calibration token ids (samples, length) of `settings`; `calibration` gets their
    description for the manifest."""
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SvdqError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    streamed = source.weights is not None
    model = stream.to_device(source.model, device) if streamed else source.model.to(device)

    def whole() -> nn.Module:  # sampling text from the model needs all of it at once
        if streamed:
            if warn is not None:
                warn("sampling calibration text from the model reads all of it into memory "
                     "once; give --calib FILE to keep memory to one block")
            stream.materialize(model, "", source.weights, source.stream_dtype, device)
        return model

    report("calibration text", 0, 1)
    ids, info = calibrate.calibration_ids(
        whole, source.tokenizer, settings.calib, settings.calib_samples, settings.calib_len,
        settings.batch_size, settings.seed, source.is_causal, report, warn)
    if streamed:
        blocks_of(model)[1].to("meta")  # back to one block at a time
    calibration.update(info)
    report("calibration text", 1, 1)
    return ids


def walk(source: Source, settings: Settings, clock: Clock, report: Progress,
         calibration: dict, gradients: bool = False,
         ids: torch.Tensor | None = None) -> Iterator[LayerWork]:
    """Calibrate, then walk the blocks; yield each target layer's work as its block is done.

    The caller may replace a yielded layer in the model at once: the block's outputs, which
    feed the next block, were computed before the first of its layers is yielded. With
    `settings.sequential` the block runs again once all its layers were yielded, so the next
    block is calibrated on what the compressed blocks before it really produce. With
    `settings.refit` too, each block first also runs on the source model's own stream, and the
    statistics pair the two streams (`LayerStats.cross`) for `refit_u`.
    With `gradients` (always for method fisher) each layer's statistics also carry its
    gradient statistics (`calibrate.gradients`: row Fisher, output sensitivity), measured on
    the source model before any block is walked.
    """
    device = torch.device(settings.device)
    if ids is None:  # `ids`: from `calibration_ids`, where the caller needs them too
        ids = calibration_ids(source, settings, report, calibration)
    streamed = source.weights is not None
    model = stream.to_device(source.model, device) if streamed else source.model.to(device)
    prefix, blocks = blocks_of(model)
    names = surgery.targets(model, settings.include, settings.exclude)
    if streamed and (gradients or settings.method == "fisher"):
        raise SvdqError("gradients need the whole model in memory; load it without streaming")
    torch.manual_seed(settings.seed)
    clock.lap("calibration text")
    grads = {}
    if gradients or settings.method == "fisher":
        grads = calibrate.gradients(model, ids, {n: model.get_submodule(n) for n in names},
                                    settings.batch_size, source.is_causal, settings.seed, report)
        clock.lap("gradients")
    inputs = calibrate.block_inputs(model, blocks[0], ids, settings.batch_size)
    # --sequential --refit: the source model's own stream too, to pair with the compressed one
    source_inputs = inputs if settings.sequential and settings.refit else None
    def stage(i: int, what: str) -> None:  # one bar over the blocks, the stage inside it
        report(f"blocks: {what}", i, len(blocks))

    for i, block in enumerate(blocks):
        if streamed:  # this block's weights, read from the source's files now
            stage(i, f"block {i + 1}: reading its weights")
            stream.materialize(block, f"{prefix}.{i}", source.weights, source.stream_dtype, device)
        stage(i, f"block {i + 1}: forward and statistics")
        mine = {n: model.get_submodule(n) for n in names if n.startswith(f"{prefix}.{i}.")}
        with calibrate.Collector(mine, paired=source_inputs is not None) as collector:
            outputs, source_outputs = [], []
            for j, (h, kw) in enumerate(inputs):
                if source_inputs is not None:  # the block is still the source's here
                    h0, kw0 = source_inputs[j]
                    with collector.source():
                        source_outputs.append((calibrate.run_block(block, h0, kw0), kw0))
                outputs.append((calibrate.run_block(block, h, kw), kw))
        stats = collector.stats
        clock.lap("forward and statistics")
        for k, (name, module) in enumerate(mine.items()):
            stage(i, f"block {i + 1}: {name.rpartition('.')[2]} ({k + 1} of {len(mine)})")
            w = weight_of(module).float()
            bias = None if module.bias is None else module.bias.detach().float()
            st = stats[name]
            st.gram, st.total = st.gram.to(device), st.total.to(device)
            if name in grads:
                st.row_fisher, st.grad2 = grads[name][0].to(device), grads[name][1]
            factors = factorize(settings.method, w, st)
            clock.lap("factorize")
            yield LayerWork(name, module, w, bias, st, factors)
        if settings.sequential:  # the caller has swapped this block's layers in: rerun it
            outputs = [(calibrate.run_block(block, h, kw), kw) for h, kw in inputs]
            clock.lap("forward and statistics")
        inputs = outputs
        if source_inputs is not None:
            source_inputs = source_outputs
        if streamed:  # done: keep what it leaves untouched, drop the rest
            stored = {n for n, m in mine.items() if model.get_submodule(n) is not m}
            stream.release(block, f"{prefix}.{i}", stored, source.released)
        del mine, stats, collector  # this block's layers and statistics, before the next one's
        stage(i + 1, "done" if i + 1 == len(blocks) else f"block {i + 2}")


def realize(model: nn.Module, work: LayerWork, choice: Choice,
            settings: Settings) -> tuple[dict, dict[str, torch.Tensor]]:
    """Swap `choice` for layer `work.name` into `model`; returns its plan entry and tensors."""
    module = work.module
    stored = {k: v.cpu() for k, v in _stored(work.name, module, choice).items()}
    plan = _plan(work.name, module, choice, stored, settings)
    if choice.kind != "dense" or choice.bits is not None:
        with_books = {**stored, **{f"svdq.codebook.{b}": codebook(b) for b in (4, 8)}}
        replacement = build_layer(plan, with_books, module.weight.dtype, set())
        surgery.set_module(model, work.name, replacement.to(module.weight.device))
    else:
        stored = {}  # kept as is: its tensors are stored with the untouched ones
    return plan, stored


@contextmanager
def swapped(model: nn.Module, works: list[LayerWork], choices: list[Choice],
            settings: Settings) -> Iterator[nn.Module]:
    """`model` with each work's layer swapped for its choice; the original layers are put
    back afterwards, whatever happens."""
    try:
        for work, choice in zip(works, choices):
            realize(model, work, choice, settings)
        yield model
    finally:
        for work in works:
            surgery.set_module(model, work.name, work.module)


def judge_of(source: Source, works: list[LayerWork], ids: torch.Tensor,
             settings: Settings) -> Callable[[list[Choice]], float]:
    """What a budget's candidate plans are compared by: the calibration loss of the model with
    the plan's layers swapped in (`calibrate.loss`; for encoders against the source's own final
    states, computed here while the model is still the source)."""
    model = source.model
    reference = None if source.is_causal else calibrate.final_states(model, ids, settings.batch_size)

    def judge(choices: list[Choice]) -> float:
        with swapped(model, works, choices, settings):
            return calibrate.loss(model, ids, settings.batch_size, source.is_causal, reference)
    return judge


def choose_form(work: LayerWork, settings: Settings, residual: Residual | None = None) -> Choice:
    """The eps-mode choice for one layer: low rank replaces the weight, or with
    `settings.residual` corrects the weight's quantization error (`residual`: that error's
    factors, made here when not given)."""
    if settings.residual:
        res = residual or residual_of(work.w, work.stats, settings.bits, settings.block_size,
                                      settings.method)
        return choose_residual(work.w, work.bias, res, work.stats, settings.eps,
                               method=settings.method)
    return choose(work.w, work.bias, work.factors, work.stats, settings.eps, settings.bits,
                  settings.block_size)


def compress(source: Source, settings: Settings, progress: Progress | None = None,
             warn: Callable[[str], None] | None = None,
             sink: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Result:
    """Compress `source.model` in place according to `settings`; `warn` hears warnings as
    they arise (they are also recorded in the result). With `sink` (an artifact's tensor
    writer) each layer's stored tensors, and a streamed block's untouched ones, go there as
    soon as they are made instead of into `Result.tensors`."""
    report = progress or (lambda stage, done, total: None)
    params = sum(p.numel() for p in source.model.parameters())
    clock, calibration = Clock(), {}
    layers: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    budget = None

    def keep(work: LayerWork, choice: Choice) -> None:
        if settings.refit:
            choice, before, after = refit_u(work.w, work.bias, choice, work.stats)
        plan, stored = realize(source.model, work, choice, settings)
        if settings.refit:  # errors against the source layer on the source model's inputs
            plan["source_error"], plan["source_error_before_refit"] = after, before
            plan["refit"] = after < before
        layers.append(plan)
        store(stored)

    def store(stored: dict[str, torch.Tensor]) -> None:
        if sink is None:
            tensors.update(stored)
            return
        sink(stored)
        if source.released:  # a streamed block just done: its untouched tensors too
            sink(dict(source.released))
            source.released.clear()

    if settings.budgeted:  # every layer is measured before any is chosen
        from svdq import budget as budgets

        budgets.check_request(source.model, settings)  # before minutes of calibration
        ids = calibration_ids(source, settings, report, calibration, warn)
        works = list(walk(source, settings, clock, report, calibration, gradients=True, ids=ids))
        choices, budget = budgets.choose_all(works, settings, report,
                                             judge_of(source, works, ids, settings))
        clock.lap("options and allocation")
        for work, choice, weight in zip(works, choices, budget.pop("weights")):
            keep(work, choice)
            layers[-1]["sensitivity"] = weight
        budget["achieved_bytes"] = sum(p["bytes"] for p in layers)
        if settings.refit:  # the refit changed the errors the allocation planned with
            budget["error2"] = math.fsum(p["sensitivity"] * p["error"] ** 2 for p in layers)
        clock.lap("quantization")
    else:
        ids = calibration_ids(source, settings, report, calibration, warn)
        for work in walk(source, settings, clock, report, calibration, ids=ids):
            keep(work, choose_form(work, settings))
            clock.lap("rank search and quantization")
    used = {p["bits"] for p in layers} | {p.get("factor_bits") for p in layers}
    store({f"svdq.codebook.{b}": codebook(b) for b in sorted(used & {4, 8})})
    return Result(source.model, layers, tensors, calibration, params, dict(clock.spent),
                  budget=budget, released=source.released)
