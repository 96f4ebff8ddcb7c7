"""Compress at many settings, evaluate each, and draw the size-versus-quality frontier.

Calibration statistics and per-layer factorizations do not depend on eps or bits, so they are
computed once (`compress.walk`) and every setting only re-runs the rank search on them. The
baselines use the same layers and the same text: the source as loaded, the target layers in
float16, and bitsandbytes weight-only quantization of the target layers (no SVD) at each bit
width, each with its exact stored bytes.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from svdq.algo.factorize import factorize
from svdq.algo.search import Choice, reference, residual_of, stored_dense
from svdq.compress import (Clock, LayerWork, Progress, calibration_ids, choose_form, judge_of,
                           realize, walk)
from svdq.config import Settings
from svdq.errors import SvdqError
from svdq.hf import Source

Evaluate = Callable[[nn.Module], dict]  # model -> {"quality": float, ...}


@dataclass(frozen=True)
class Metric:
    name: str  # "perplexity" or "similarity"
    lower_is_better: bool


def _dense(work: LayerWork, bits: int, block_size: int) -> Choice:
    """The layer's weight quantized at `bits` alone: a bitsandbytes baseline."""
    return stored_dense(work.w, work.stats, reference(work.w, work.bias, work.stats), bits,
                        block_size, k_break=0)


def _variant(model: nn.Module, works: list[LayerWork], choices: list[Choice],
             settings: Settings) -> tuple[nn.Module, list[dict]]:
    """A copy of the (uncompressed) model with each target swapped for its choice."""
    variant = copy.deepcopy(model)
    plans = [realize(variant, w, c, settings)[0] for w, c in zip(works, choices)]
    return variant, plans


def pareto(rows: list[dict], lower_is_better: bool) -> list[dict]:
    """Rows no other row beats on both bytes (fewer or equal) and quality (better or equal)."""
    def better(a: float, b: float) -> bool:
        return a <= b if lower_is_better else a >= b

    front = []
    for r in rows:
        dominated = any(o is not r and o["target_bytes"] <= r["target_bytes"]
                        and better(o["quality"], r["quality"])
                        and (o["target_bytes"], o["quality"]) != (r["target_bytes"], r["quality"])
                        for o in rows)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r["target_bytes"])


def evaluator(source: Source, text: tuple[str, str] | None, lines: list[str] | None,
              ctx: int | None, stride: int | None, max_tokens: int,
              batch_size: int) -> tuple[Evaluate, Metric]:
    """How each variant is scored: perplexity on `text`, or the mean cosine similarity of its
    sentence embeddings of `lines` to the source's (computed once, here)."""
    from svdq import evaluate as ev

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
        ratios: list[float] | None = None) -> dict:
    """Analyse once, then evaluate baselines and every (method, bits, eps) setting.

    `methods` defaults to `settings.method`; the calibration statistics serve them all, and
    each method factorizes each layer once. `residual` adds, per method, bits and eps, the
    quantized weights with low-rank corrections of their error (`--residual`); each of `ratios`
    adds, per method, the global byte budget of that fraction of fp16 (`--ratio`), whose
    options are measured once per method for all ratios.
    """
    from svdq import budget

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
    works = list(walk(source, settings, clock, report, calibration, gradients=gradients, ids=ids))
    factors = {settings.method: [w.factors for w in works]}
    judge = judge_of(source, works, ids, settings) if ratios else None  # one for every budget
    for method in methods:
        if method not in factors:
            factors[method] = [factorize(method, w.w, w.stats) for w in works]
            clock.lap("factorize")
    analysis_s = sum(clock.spent.values())
    fp16_bytes = sum(2 * (w.w.numel() + (0 if w.bias is None else w.bias.numel())) for w in works)
    jobs: list[tuple[str, int | None, float | None, float | None,
                     Callable[[], list[Choice]] | None]] = [
        ("source", None, None, None, None),
        ("fp16", 16, None, None, lambda: [_dense(w, 16, settings.block_size) for w in works]),
    ]
    for bits in bits_list:
        if bits != 16:
            label = "bnb-nf4" if bits == 4 else "bnb-8bit"
            jobs.append((label, bits, None, None,
                         lambda b=bits: [_dense(w, b, settings.block_size) for w in works]))
    if ratios:  # budgets may store weights in larger blocks: so may the baselines
        for b, m in sorted(budget.RESIDUAL_BASES):
            if m != 1:
                block = m * settings.block_size
                jobs.append((f"bnb-{'nf4' if b == 4 else '8bit'}-b{block}", b, None, None,
                             lambda b=b, k=block: [_dense(w, b, k) for w in works]))
    for method in methods:
        mine = [replace(w, factors=f) for w, f in zip(works, factors[method])]
        for bits in bits_list:
            for eps in eps_list:
                s = replace(settings, method=method, bits=bits, eps=eps)
                jobs.append((method, bits, eps, None,
                             lambda s=s, mine=mine: [choose_form(w, s) for w in mine]))
        for bits in bits_list if residual else ():
            corrections: list = []  # each layer's Residual, made once for all eps

            def corrected(eps: float, m=method, b=bits, c=corrections) -> list[Choice]:
                if not c:
                    c.extend(residual_of(w.w, w.stats, b, settings.block_size, m) for w in works)
                s = replace(settings, method=m, bits=b, eps=eps, residual=True)
                return [choose_form(w, s, r) for w, r in zip(works, c)]
            for eps in eps_list:
                jobs.append((f"{method}+residual", bits, eps, None,
                             lambda e=eps, f=corrected: f(e)))
        if ratios:
            s = replace(settings, method=method, budget_ratio=ratios[0])
            measured: dict = {}

            def allocation(ratio: float, s=s, mine=mine, measured=measured) -> list[Choice]:
                if not measured:  # measured once per method, on first use
                    measured["m"] = budget.measure(mine, s, report)
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


COLUMNS = ["method", "bits", "eps", "ratio", "target_bytes", "target_ratio_fp16", "quality",
           "lowrank_layers", "residual_layers", "layers", "mean_layer_error", "build_s", "eval_s",
           "pareto"]


def write(results: dict, folder: Path) -> list[Path]:
    """results.json, results.csv and frontier.png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["rows"])
    plot(results, folder / "frontier.png")
    return [folder / n for n in ("results.json", "results.csv", "frontier.png")]


def plot(results: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, metric = results["rows"], results["metric"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["eps"] is None and r.get("ratio") is None:  # a baseline: one point
            ax.scatter(r["target_bytes"] / 1e6, r["quality"], marker="s", s=60, zorder=3,
                       label=r["method"])
        elif r["eps"] is None:  # a budget: one series per method
            series.setdefault(r["method"], []).append(r)
        else:
            series.setdefault(f"{r['method']} {r['bits']}-bit", []).append(r)
    for label, pts in series.items():
        pts = sorted(pts, key=lambda r: r["target_bytes"])
        ax.plot([p["target_bytes"] / 1e6 for p in pts], [p["quality"] for p in pts], "o-",
                label=label, zorder=2)
        for p in pts:
            tag = f"ε={p['eps']:g}" if p["eps"] is not None else f"r={p['ratio']:g}"
            ax.annotate(tag, (p["target_bytes"] / 1e6, p["quality"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: (r["target_bytes"], r["quality"]))
    ax.step([r["target_bytes"] / 1e6 for r in front], [r["quality"] for r in front],
            where="post", color="black", lw=1, ls="--", label="Pareto frontier", zorder=1)
    ax.set_xlabel("stored bytes of the compressed layers (MB)")
    ax.set_ylabel("perplexity (lower is better)" if metric == "perplexity"
                  else "cosine similarity to the source (higher is better)")
    values = [r["quality"] for r in rows]
    if metric == "perplexity" and max(values) > 3 * min(values):  # a wide range: log scale
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title(f"{Path(results['source']).name}: size vs {metric}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
