"""Benchmark: kernels sessions 27 and 28 made cheaper, each beside what it replaced.

    python benchmarks/kernel_speed.py [--tokens 4096] [--widths 576,1536] [--repeat 5]

- A Gram's products for one batch (`collect._add_products`): the upper triangle's blocks
  (a Gram, `b is a`) against every block (a product of two streams, as before).
- A base error's whitened SVD (`factorize.whitened_svd`) in float64 (the default) and in
  float32 (`--fast`), on a random error and the Gram of random inputs whose channels' scales
  rise from 0.1 to 3, for a wide layer (576 × width) and a tall one (width × 576).
- GPTQ's column loop (`gptq.gptq_many`) on the grids a `--fast` budget at 4.3 bits stacks
  (int4 in 64, NF4 in 256, int8 in 128) at SmolLM2's stacked shapes (q, k and v: 960 × 576;
  gate and up: 3072 × 576; down: 576 × 1536), in sub-batches of `gptq.INNER` columns against
  whole lazy batches (`INNER = LAZY`: each column updating the rest of its 128, as before
  session 28; the rounding is today's in both).
Prints milliseconds per call (median of --repeat, after one warm-up), one job on the machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from svdq.algo import gptq
from svdq.algo.factorize import LayerStats, whitened_svd
from svdq.calibration import collect


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--widths", default="576,1536")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)

    def inputs(n: int) -> tuple[torch.Tensor, LayerStats]:
        x = torch.randn(args.tokens, n, generator=gen) * torch.linspace(0.1, 3, n)
        return x, LayerStats(x.double().T @ x.double(), x.double().sum(0), args.tokens)

    _, narrow = inputs(576)
    for n in map(int, args.widths.split(",")):
        x, wide = inputs(n)
        acc, other = torch.zeros(n, n, dtype=torch.float64), x.clone()
        gram = timed(lambda: collect._add_products(acc, x, x), args.repeat)
        full = timed(lambda: collect._add_products(acc, x, other), args.repeat)
        print(f"Gram products, {args.tokens} tokens × {n}: upper blocks {gram:.1f} ms, "
              f"every block {full:.1f} ms")
        for shape, stats in (((576, n), wide), ((n, 576), narrow)):
            e = torch.randn(*shape, generator=gen) * 0.01
            t64 = timed(lambda: whitened_svd(e, stats, torch.float64), args.repeat)
            t32 = timed(lambda: whitened_svd(e, stats, torch.float32), args.repeat)
            print(f"whitened SVD of a {shape[0]} × {shape[1]} error: float64 {t64:.1f} ms, "
                  f"float32 {t32:.1f} ms")
    grids = [(4, 64, "int", False), (4, 256, "bnb", False), (8, 128, "int", False)]
    inner = gptq.INNER
    for rows, cols in ((960, 576), (3072, 576), (576, 1536)):
        x, stats = inputs(cols)
        prepared = gptq.prepare(stats.gram)
        w = torch.randn(rows, cols, generator=gen) * 0.05
        loop = lambda: gptq.gptq_many(w, stats.gram, grids, prepared=prepared)  # noqa: E731
        try:
            gptq.INNER = gptq.LAZY
            whole = timed(loop, args.repeat)
        finally:
            gptq.INNER = inner
        print(f"GPTQ loop, {rows} × {cols} on {len(grids)} grids: sub-batches of {inner} "
              f"{timed(loop, args.repeat):.0f} ms, whole batches {whole:.0f} ms")


if __name__ == "__main__":
    main()
