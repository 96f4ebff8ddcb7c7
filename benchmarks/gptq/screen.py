"""Can rounding screen a budget's quantized bases before GPTQ builds them? For each target
layer of SmolLM2's first blocks and each base a budget offers (`pipeline.options.RESIDUAL_BASES`),
the layer's relative output error on the calibration inputs quantized by round-to-nearest
(svdq's: integer scales weighed by input energy) and by GPTQ — the number the options stage
pays a GPTQ column loop per layer for.

    python benchmarks/gptq/screen.py [--blocks 6] [--samples 32]

Prints, per base, the ratio GPTQ/RTN over the layers (median, 10th and 90th percentile) and
the rank correlation of the two errors across layers, and the ratio relative to the same
layer's ratio at int4 in groups of 64 (how well one GPTQ base per layer would predict the
others from their rounding); then how often, per layer, rounding
orders two bases whose errors are close the way GPTQ does. A tight ratio and the same order would
let the allocation run on rounding's errors scaled by the ratio and GPTQ build only the bases
near each layer's pick (issue 10's screen); a wide one would not.
"""
from __future__ import annotations

import argparse
import sys
from itertools import combinations
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))


def ranks(xs: list[float]) -> list[int]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    out = [0] * len(xs)
    for r, i in enumerate(order):
        out[i] = r
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def first_blocks(description: str):
    """`--blocks`/`--samples` parsed, and the work (weights and statistics) of every target
    layer of SmolLM2's first blocks on that many calibration sequences of the bench text."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()

    from svdq import assets
    from svdq.config import Settings
    from svdq.models import load
    from svdq.pipeline.inputs import calibration_ids
    from svdq.pipeline.analyse import analyse
    from svdq.pipeline.work import Clock

    calib = assets.cache_dir() / "bench-text" / "calib.txt"
    source = load.load_source(str(assets.fetch("smollm2")), stream=False)
    settings = Settings(calib=str(calib), calib_samples=args.samples, method="whiten",
                        include=tuple(f"model.layers.{i}.*" for i in range(args.blocks)))
    ids = calibration_ids(source, settings, lambda *a: None, {})
    return args, settings, analyse(source, settings, ids, lambda *a: None, Clock())


def main() -> None:
    args, settings, works = first_blocks(__doc__.splitlines()[0])
    from svdq.algo.dense import quantize_each, quantize_weight
    from svdq.algo.error import reference, relative_error
    from svdq.algo.quant import weight_bytes
    from svdq.pipeline.options import RESIDUAL_BASES
    grids = [(b, m * settings.block_size, g) for b, m, g in RESIDUAL_BASES]
    rtn = {g: [] for g in grids}
    gptq = {g: [] for g in grids}
    for work in works:
        ref = reference(work.w, work.bias, work.stats)
        for g, q in zip(grids, quantize_each([work.w] * len(grids), work.stats, grids, True)):
            gptq[g].append(relative_error(work.w, q.dequantize(), work.stats, ref))
            r = quantize_weight(work.w, work.stats, *g, gptq=False)
            rtn[g].append(relative_error(work.w, r.dequantize(), work.stats, ref))
        print(f"{work.name}: " + ", ".join(f"{g[2]}{g[0]}/{g[1]} {rtn[g][-1]:.4f}→{gptq[g][-1]:.4f}"
                                            for g in grids), flush=True)
    print(f"\nSmolLM2, blocks 1–{args.blocks} ({len(works)} layers), {args.samples} × 512 "
          "calibration tokens\n\n| base | bits/weight | GPTQ/RTN median | p10 | p90 | "
          "rank correlation across layers | that ratio over the layer's int4-in-64 ratio: "
          "median, p10, p90 |\n|---|---|---|---|---|---|---|")
    anchor = (4, settings.block_size, "int")

    def spread(xs: list[float]) -> str:
        xs = sorted(xs)
        return " / ".join(f"{xs[min(len(xs) - 1, int(q * len(xs)))]:.3f}" for q in (0.5, 0.1, 0.9))
    for g in grids:
        ratio = [b / a for a, b in zip(rtn[g], gptq[g])]
        own = [r / (b / a) for r, a, b in zip(ratio, rtn[anchor], gptq[anchor])]
        print(f"| {g[2]}{g[0]} in {g[1]} | {weight_bytes(4096, 4096, *g) * 8 / 4096 ** 2:.3f} | "
              + spread(ratio).replace(" / ", " | ") + f" | {spearman(rtn[g], gptq[g]):.3f} | "
              f"{spread(own)} |")
    same = pairs = 0  # only the close calls: errors within 1.5x of each other either way
    for a, b in combinations(grids, 2):
        for n in range(len(works)):
            if max(rtn[a][n], rtn[b][n]) < 1.5 * min(rtn[a][n], rtn[b][n]) or \
                    max(gptq[a][n], gptq[b][n]) < 1.5 * min(gptq[a][n], gptq[b][n]):
                pairs += 1
                same += (rtn[a][n] < rtn[b][n]) == (gptq[a][n] < gptq[b][n])
    print(f"\nclose pairs of bases in a layer (errors within 1.5x of each other by either) "
          f"ordered the same way by rounding and by GPTQ: {same} of {pairs}")


if __name__ == "__main__":
    main()
