"""Benchmark: how much refining a correction (algo.residual.refine_residual) lowers a layer's error.

    python benchmarks/refine_residual.py     # SmolLM2, block 3's seven layers, NF4 + corrections

Calibrates on 8 × 512 tokens of the calibration part of the offline text, gathers block 3's
statistics, and for each layer, NF4 block size (64, 256) and correction rank (16, 64) prints the
stored relative error of the whitened correction as first computed and after refinement (same
bytes). Writes results/refine_residual.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from svdq import assets
from svdq.algo.error import reference
from svdq.algo.residual import refine_residual, residual_of, stored_residual
from svdq.calibration import text as calibrate
from svdq.calibration.collect import collect
from svdq.models import blocks as model_blocks
from svdq.models import load as hf
from svdq.models.layers import blocks_of

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from sweep import split_text  # noqa: E402


def main() -> None:
    source = hf.load_source(str(assets.fetch("smollm2")))
    model, calib = source.model, split_text(assets.cache_dir() / "bench-text")[0]
    prefix, blocks = blocks_of(model)
    ids, _ = calibrate.calibration_ids(model, source.tokenizer, str(calib), 8, 512, 8, 0, True)
    captured = model_blocks.capture(model, ids, 8)
    hidden = captured.hidden
    for i, block in enumerate(blocks[:3]):
        hidden = [model_blocks.run_block(block, h, captured.kwargs[i][b]) for b, h in enumerate(hidden)]
    layers = {n: m for n, m in model.named_modules()
              if n.startswith(f"{prefix}.3.") and isinstance(m, torch.nn.Linear)}
    with collect(layers) as stats:
        for b, h in enumerate(hidden):
            model_blocks.run_block(blocks[3], h, captured.kwargs[3][b])
    lines = ["# Refining NF4 corrections (SmolLM2, block 3)", "",
             "`python benchmarks/refine_residual.py` — stored relative output error on 8 × 512",
             "calibration tokens, whitened correction, 8-bit factors.", "",
             "| layer | NF4 block | rank | first | refined | change |", "|---|---|---|---|---|---|"]
    for name, module in layers.items():
        w, st = module.weight.detach().float(), stats[name]
        ref = reference(w, None, st)
        for block_size in (64, 256):
            res = residual_of(w, st, 4, block_size, "whiten")
            for k in (16, 64):
                first = stored_residual(w, res, st, ref, k, k)
                refined = refine_residual(w, first, st, ref, "whiten")
                lines.append(f"| {name.split('.', 3)[-1]} | {block_size} | {k} | "
                             f"{first.error:.4f} | {refined.error:.4f} | "
                             f"{refined.error / first.error - 1:+.1%} |")
                print(lines[-1], flush=True)
    (HERE / "results" / "refine_residual.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
