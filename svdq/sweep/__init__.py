"""Compress at many settings, evaluate each, and draw the size-versus-quality frontier.

Calibration statistics and per-layer factorizations do not depend on eps or bits, so they are
computed once (`compress.walk`) and every setting only re-runs the rank search on them. The
baselines use the same layers and the same text: the source as loaded, the target layers in
float16, and bitsandbytes weight-only quantization of the target layers (no SVD) at each bit
width, each with its exact stored bytes.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from svdq.algo.dense import stored_dense
from svdq.algo.error import reference
from svdq.algo.factorize import factorize
from svdq.algo.residual import residual_of
from svdq.algo.stored import Stored
from svdq.config import Settings
from svdq.errors import SvdqError
from svdq.models.layers import set_module
from svdq.models.load import Source
from svdq.pipeline import budget
from svdq.pipeline.compress import choose_form, realize
from svdq.pipeline.judge import judge_of
from svdq.pipeline.measured import measure
from svdq.pipeline.options import RESIDUAL_BASES
from svdq.pipeline.inputs import calibration_ids
from svdq.pipeline.analyse import analyse
from svdq.pipeline.work import Clock, LayerWork, Progress
from svdq.sweep.results import pareto, plot, write  # noqa: F401 - the results' API

Evaluate = Callable[[nn.Module], dict]  # model -> {"quality": float, ...}


@dataclass(frozen=True)
class Metric:
    name: str  # "perplexity" or "similarity"
    lower_is_better: bool


def _dense(work: LayerWork, bits: int, block_size: int, grid: str = "bnb",
           gptq: bool = False) -> Stored:
    """The layer's weight quantized at `bits` alone: a quantization-only baseline."""
    return stored_dense(work.w, work.stats, reference(work.w, work.bias, work.stats), bits,
                        block_size, 0, grid, gptq)


def grid_for(bits: int, grid: str) -> str:
    """The grid `--grid` means at `bits` (auto: the integer one below 4 bits; float16: bnb)."""
    if grid == "auto":
        return "int" if bits in (2, 3) else "bnb"
    return "bnb" if bits == 16 else grid


def baselines(bits_list: list[int], settings: Settings, budgets: bool,
              grid: str = "auto") -> list[tuple]:
    """(label, bits, block, grid, gptq) of the quantization-only rows: bitsandbytes' own
    rounding (NF4, 8-bit) at each bnb width, GPTQ (or rounding with --no-gptq) on the integer
    grid at each integer width; with budgets also every base the budgets may use."""
    forms = [(b, settings.block_size, grid_for(b, grid)) for b in bits_list if b != 16]
    if budgets:
        forms += [(b, m * settings.block_size, g) for b, m, g in RESIDUAL_BASES]
    rows = {}
    for bits, block, grid in forms:
        if grid == "bnb":
            tag = "" if block == settings.block_size else f"-b{block}"
            rows[(bits, block, grid)] = (f"bnb-{'nf4' if bits == 4 else '8bit'}{tag}", False)
        else:
            way = "gptq" if settings.gptq else "rtn"
            rows[(bits, block, grid)] = (f"{way}-int{bits}-g{block}", settings.gptq)
    return [(label, *form, gptq) for form, (label, gptq) in rows.items()]


def _variant(model: nn.Module, works: list[LayerWork], choices: list[Stored],
             settings: Settings) -> tuple[nn.Module, list[dict]]:
    """A copy of the (uncompressed) model with each target swapped for its stored form."""
    variant = copy.deepcopy(model)
    plans = []
    for work, stored in zip(works, choices):
        plan, _, module = realize(work, stored, settings)
        if module is not None:
            set_module(variant, work.name, module)
        plans.append(plan.to_json())
    return variant, plans


PIXEL_CACHE_BYTES = 2 ** 30  # a sweep keeps its --accuracy images processed up to this size


def evaluator(source: Source, text: tuple[str, str] | None, lines: list[str] | None,
              ctx: int | None, stride: int | None, max_tokens: int,
              batch_size: int, images: Path | None = None) -> tuple[Evaluate, Metric]:
    """How each variant is scored: perplexity on `text`, the mean cosine similarity of its
    sentence embeddings of `lines` to the source's (computed once, here), or an image
    classifier's top-1 accuracy on the labelled folder `images`."""
    from svdq import evaluate as ev

    if images is not None:
        from svdq.calibration.images import labelled
        from svdq.evaluate.accuracy import batches, check_classifier, logits_of, scores

        data = labelled(images, check_classifier(source.model, source.id))
        labels = torch.tensor([y for _, y in data])
        channels = getattr(source.model.config, "num_channels", 3)
        batch = max(batch_size, 32)
        # every variant sees the same images: read and processed once where they fit in
        # PIXEL_CACHE_BYTES (float32), else again for each
        first = next(batches(source.tokenizer, data[:1], channels, 1))
        cached = list(batches(source.tokenizer, data, channels, batch)) \
            if first.numel() * 4 * len(data) <= PIXEL_CACHE_BYTES else None

        def accuracy(model: nn.Module) -> dict:
            pixels = cached if cached is not None else batches(source.tokenizer, data,
                                                               channels, batch)
            logits, spent = logits_of([model], pixels)
            return {"quality": scores(logits[0], labels)["top1"], "seconds": spent[0]}
        return accuracy, Metric("top-1 accuracy", False)

    if text is not None:
        ids = ev.tokenize(source.tokenizer, text[0], max_tokens)
        window = ctx or ev.default_ctx(source.model)
        ev.check_windows(source.model, window, stride or window)

        def perplexity(model: nn.Module) -> dict:
            r = ev.perplexity(model, ids, window, stride or window, batch_size)
            return {"quality": r["ppl"], "seconds": r["seconds"]}
        return perplexity, Metric("perplexity", True)

    reference = ev.embed(source.model, source.tokenizer, lines, batch_size)

    def similarity(model: nn.Module) -> dict:
        start = time.perf_counter()
        emb = ev.embed(model, source.tokenizer, lines, batch_size)
        cos = torch.nn.functional.cosine_similarity(emb, reference, dim=-1)
        return {"quality": cos.mean().item(), "seconds": time.perf_counter() - start}
    return similarity, Metric("similarity", False)


def run(source: Source, settings: Settings, eps_list: list[float], bits_list: list[int],
        evaluate: Evaluate, metric: Metric, progress: Progress | None = None,
        methods: list[str] | None = None, residual: bool = False,
        ratios: list[float] | None = None, grid: str = "auto", with_baselines: bool = True
        ) -> dict:
    """Analyse once, then evaluate baselines (unless not `with_baselines`: the source alone)
    and every (method, bits, eps) setting.

    `methods` defaults to `settings.method`; the calibration statistics serve them all, and
    each method factorizes each layer once. `residual` adds, per method, bits and eps, the
    quantized weights with low-rank corrections of their error (`--residual`); each of `ratios`
    adds, per method, the global byte budget of that fraction of fp16 (`--ratio`), whose
    options are measured once per method for all ratios.
    """
    if settings.sequential:
        raise SvdqError("sweep shares one calibration across settings, which --sequential "
                        "cannot (its statistics depend on each setting's choices); drop it")
    report = progress or (lambda stage, done, total: None)
    methods = methods or [settings.method]
    ratios = ratios or []
    clock, calibration = Clock(), {}
    original = source.model
    gradients = bool(ratios) or "fisher" in methods  # budgets weigh layers by sensitivity
    ids = calibration_ids(source, settings, report, calibration)
    works = analyse(source, settings, ids, report, clock, gradients=gradients,
                    fisher="fisher" in methods, budget=bool(ratios))
    factors = {settings.method: [w.factors for w in works]}
    judge = judge_of(source, works, ids, settings) if ratios else None  # one for every budget
    for method in methods:
        if method not in factors:
            factors[method] = [factorize(method, w.w, w.stats) for w in works]
            clock.lap("factorize")
    analysis_s = sum(clock.spent.values())
    fp16_bytes = sum(2 * (w.w.numel() + (0 if w.bias is None else w.bias.numel())) for w in works)
    jobs: list[tuple[str, int | None, float | None, float | None,
                     Callable[[], list[Stored]] | None]] = [
        ("source", None, None, None, None),
        ("fp16", 16, None, None, lambda: [_dense(w, 16, settings.block_size) for w in works]),
    ][:2 if with_baselines else 1]
    for label, b, block, g, gptq in (baselines(bits_list, settings, bool(ratios), grid)
                                     if with_baselines else []):
        jobs.append((label, b, None, None, lambda b=b, k=block, g=g, q=gptq:
                     [_dense(w, b, k, g, q) for w in works]))
    for method in methods:
        mine = [replace(w, given=f) for w, f in zip(works, factors[method])]
        for bits in bits_list:
            for eps in eps_list:
                s = replace(settings, method=method, bits=bits, eps=eps, grid=grid_for(bits, grid))
                jobs.append((method, bits, eps, None,
                             lambda s=s, mine=mine: [choose_form(w, s) for w in mine]))
        for bits in bits_list if residual else ():
            corrections: list = []  # each layer's Residual, made once for all eps

            def corrected(eps: float, m=method, b=bits, c=corrections) -> list[Stored]:
                if not c:
                    c.extend(residual_of(w.w, w.stats, b, settings.block_size, m,
                                         grid_for(b, grid), settings.gptq) for w in works)
                s = replace(settings, method=m, bits=b, eps=eps, residual=True,
                            grid=grid_for(b, grid))
                return [choose_form(w, s, r) for w, r in zip(works, c)]
            for eps in eps_list:
                jobs.append((f"{method}+residual", bits, eps, None,
                             lambda e=eps, f=corrected: f(e)))
        if ratios:
            s = replace(settings, method=method, budget_ratio=ratios[0])
            measured: dict = {}

            def allocation(ratio: float, s=s, mine=mine, measured=measured) -> list[Stored]:
                if not measured:  # measured once per method, on first use
                    bits = (16 * min(ratios), 16 * max(ratios))  # the bases all budgets need
                    measured["m"] = measure(mine, s, report, bits)
                return budget.pick(mine, measured["m"], math.floor(ratio * fp16_bytes), s,
                                   judge)[0]
            for ratio in ratios:
                jobs.append((f"{method} budget", None, None, ratio,
                             lambda r=ratio, a=allocation: a(r)))
    rows = []
    for i, (label, bits, eps, ratio, make) in enumerate(jobs):
        report("settings", i, len(jobs))
        start = time.perf_counter()
        if make is None:  # the source as loaded: its own bytes
            model, plans = original, None
            nbytes = sum(w.w.numel() * w.module.weight.element_size()
                         + (0 if w.bias is None else w.bias.numel() * w.module.bias.element_size())
                         for w in works)
        else:
            model, plans = _variant(original, works, make(), settings)
            nbytes = sum(p["bytes"] for p in plans)
        build_s = time.perf_counter() - start
        result = evaluate(model)
        kinds = [] if plans is None else [p["kind"] for p in plans]
        rows.append({
            "method": label, "bits": bits, "eps": eps, "ratio": ratio, "target_bytes": nbytes,
            "target_ratio_fp16": nbytes / fp16_bytes, "quality": result["quality"],
            "lowrank_layers": kinds.count("lowrank"), "residual_layers": kinds.count("residual"),
            "sparse_layers": sum(bool(p.get("sparse_nnz")) for p in plans or []),
            "layers": len(works), "mean_layer_error": None if plans is None else
            sum(p["error"] for p in plans) / len(plans),
            "build_s": round(build_s, 2), "eval_s": round(result.get("seconds", 0.0), 2),
        })
        if model is not original:
            del model
    report("settings", len(jobs), len(jobs))
    front = {id(r) for r in pareto(rows, metric.lower_is_better)}
    for r in rows:
        r["pareto"] = id(r) in front
    return {"source": source.id, "metric": metric.name, "settings": settings.to_dict(),
            "calibration": calibration, "analysis_s": round(analysis_s, 2),
            "analysis_stages_s": {k: round(v, 1) for k, v in clock.spent.items()},
            "target_fp16_bytes": fp16_bytes, "rows": rows}
