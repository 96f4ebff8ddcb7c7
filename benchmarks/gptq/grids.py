"""Which grids a quick budget should offer: per target layer of SmolLM2's first blocks, the
relative output error on the calibration inputs by GPTQ (svdq's, as a budget quantizes its
bases) on each of the integer grid at 3 and 4 bits in groups of 64, 128 and 256 and NF4 in
blocks of 64 and 256; printed with each grid's bits per weight as stored.

    python benchmarks/gptq/grids.py [--blocks 6] [--samples 32]

(`results/gptq_grids/session28.txt`: NF4 in 256 dominates int4 in 128, so `--fast` never
offers the latter: `options.bases`.)
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from screen import first_blocks  # noqa: E402


def main() -> None:
    args, _, works = first_blocks(__doc__.splitlines()[0])
    from svdq.algo.dense import quantize_each
    from svdq.algo.error import reference, relative_error
    from svdq.algo.quant import weight_bytes

    grids = [(4, 64, "int"), (4, 128, "int"), (4, 256, "int"), (4, 256, "bnb"), (4, 64, "bnb"),
             (3, 64, "int"), (3, 128, "int"), (3, 256, "int")]
    errs = {g: [] for g in grids}
    for work in works:
        ref = reference(work.w, work.bias, work.stats)
        for g, q in zip(grids, quantize_each([work.w] * len(grids), work.stats, grids, True)):
            errs[g].append(relative_error(work.w, q.dequantize(), work.stats, ref))
    print(f"SmolLM2, blocks 1-{args.blocks} ({len(works)} layers), {args.samples} x 512 tokens, GPTQ\n")
    print("| grid | bits/weight | median error | mean error² | over int4-in-256's, median |")
    print("|---|---|---|---|---|")
    anchor = errs[(4, 256, "int")]
    for g in grids:
        e = errs[g]
        print(f"| {'int' if g[2] == 'int' else 'NF'}{g[0]} in {g[1]} | "
              f"{weight_bytes(4096, 4096, *g) * 8 / 4096 ** 2:.3f} | {statistics.median(e):.4f} | "
              f"{statistics.fmean(x * x for x in e):.6f} | "
              f"{statistics.median(a / b for a, b in zip(e, anchor)):.3f} |")


if __name__ == "__main__":
    main()
