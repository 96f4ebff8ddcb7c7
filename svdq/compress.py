"""Orchestration: calibrate -> factorize -> search -> quantize -> replace, block by block.

The walk captures what the first block receives, then runs the blocks one at a time on those
inputs. Per block: hooks gather the statistics of its target layers while the block runs,
then each target is factorized once, its rank searched, and the layer swapped for the module
the artifact will hold. The next block receives the outputs of the original block.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from svdq import calibrate, surgery
from svdq.algo.factorize import factorize
from svdq.algo.quant import codebook
from svdq.algo.search import Choice, choose
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


def _stored(name: str, module: nn.Module, choice: Choice) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if choice.kind == "lowrank":
        out.update(choice.u.tensors(name + ".svdq.u"))
        out.update(choice.v.tensors(name + ".svdq.v"))
        out[name + ".svdq.s"] = choice.s
    elif choice.bits is not None:
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
    return {"name": name, "module": type(module).__name__, "out_features": out_f,
            "in_features": in_f, "bias": module.bias is not None, "kind": choice.kind,
            "rank": choice.rank, "k_break": choice.k_break, "bits": choice.bits,
            "block_size": settings.block_size, "bytes": nbytes, "fp16_bytes": fp16,
            "error": choice.error}


def compress(source: Source, settings: Settings, progress: Progress | None = None) -> Result:
    """Compress `source.model` in place according to `settings`."""
    report = progress or (lambda stage, done, total: None)
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SvdqError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    model = source.model.to(device)
    params = sum(p.numel() for p in model.parameters())
    prefix, blocks = blocks_of(model)
    names = surgery.targets(model, settings.include, settings.exclude)
    torch.manual_seed(settings.seed)

    clock = defaultdict(float)
    t0 = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        clock[stage] += now - t0
        t0 = now

    report("calibration text", 0, 1)
    ids, calibration = calibrate.calibration_ids(
        model, source.tokenizer, settings.calib, settings.calib_samples, settings.calib_len,
        settings.batch_size, settings.seed, source.is_causal)
    report("calibration text", 1, 1)
    lap("calibration text")
    inputs = calibrate.block_inputs(model, blocks[0], ids, settings.batch_size)

    layers: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    codebooks_used: set[int] = set()
    for i, block in enumerate(blocks):
        mine = {n: model.get_submodule(n) for n in names if n.startswith(f"{prefix}.{i}.")}
        with calibrate.collect(mine) as stats:
            outputs = [(calibrate.run_block(block, h, kw), kw) for h, kw in inputs]
        lap("forward and statistics")
        for name, module in mine.items():
            w = weight_of(module).float()
            bias = None if module.bias is None else module.bias.detach().float()
            st = stats[name]
            st.gram, st.total = st.gram.to(device), st.total.to(device)
            factors = factorize(settings.method, w, st)
            lap("factorize")
            choice = choose(w, bias, factors, st, settings.eps, settings.bits, settings.block_size)
            stored = {k: v.cpu() for k, v in _stored(name, module, choice).items()}
            plan = _plan(name, module, choice, stored, settings)
            if choice.bits in (4, 8):
                codebooks_used.add(choice.bits)
            if choice.kind == "lowrank" or choice.bits is not None:
                with_books = {**stored, **{f"svdq.codebook.{b}": codebook(b) for b in (4, 8)}}
                replacement = build_layer(plan, with_books, module.weight.dtype, set())
                surgery.set_module(model, name, replacement.to(device))
                tensors.update(stored)
            layers.append(plan)
            lap("rank search and quantization")
            report("layers", len(layers), len(names))
        inputs = [(h, kw) for h, kw in outputs]
    for b in sorted(codebooks_used):
        tensors[f"svdq.codebook.{b}"] = codebook(b)
    return Result(model, layers, tensors, calibration, params, dict(clock))
