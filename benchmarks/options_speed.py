"""Benchmark: what a budget's option measurement costs per layer, in time and memory.

    python benchmarks/options_speed.py [--shapes 2048x5632,5632x2048,2048x2048,256x2048]
                                       [--ratio 0.3] [--bits 4] [--sparse 0.005]

For each (out × in) shape — by default the seven layers of one TinyLlama-1.1B block: q and o
2048 × 2048, k and v 256 × 2048, gate and up 5632 × 2048, down 2048 × 5632 (each listed once;
count q/o, k/v and gate/up twice) — a bf16 layer with random weights and the Gram of 8,192
random inputs whose channels' scales rise from 0.1 to 3 is measured as `svdq compress
--ratio R` measures it in its first pass (`pipeline.measured.measure_layer`, whitened factors,
GPTQ bases), under the allocator settings the `svdq` command uses (`stream.tame_malloc`), after
one unreported warm-up layer (the first measurement otherwise carries about 1.7 s of one-time
costs). Prints seconds and the RSS high-water mark above the start (VmHWM, reset per layer:
Linux only). Random weights make the spectra flat, so this measures cost, not quality.
With `--sparse` the options include the sparse variants `--ratio R --sparse S` measures.
"""
from __future__ import annotations

import argparse
import time

import torch

from svdq.algo.factorize import LayerStats
from svdq.config import Settings
from svdq.models.stream import tame_malloc
from svdq.pipeline.measured import measure_layer
from svdq.pipeline.work import LayerWork


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith(field))


def one(out_f: int, in_f: int, settings: Settings, average: tuple[float, float]) -> tuple[float, int]:
    gen = torch.Generator().manual_seed(0)
    gram = torch.zeros(in_f, in_f, dtype=torch.float64)
    total = torch.zeros(in_f, dtype=torch.float64)
    for _ in range(4):
        x = (torch.randn(2048, in_f, generator=gen) * torch.linspace(0.1, 3, in_f)).double()
        gram += x.T @ x
        total += x.sum(0)
    del x
    layer = torch.nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
    work = LayerWork("layer", layer, None, None, LayerStats(gram, total, 8192), settings.method)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start, t0 = status("VmRSS:"), time.perf_counter()
    measure_layer(work, settings, average)
    return time.perf_counter() - t0, status("VmHWM:") - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="2048x5632,5632x2048,2048x2048,256x2048")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--sparse", type=float, default=0.0)
    args = ap.parse_args()
    settings = Settings(bits=args.bits, budget_ratio=args.ratio, method="whiten",
                        sparse=args.sparse)
    per_weight = 16 * args.ratio
    tame_malloc()
    one(64, 64, settings, (per_weight, per_weight))  # warm-up: not a layer's cost
    for shape in args.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        seconds, peak = one(out_f, in_f, settings, (per_weight, per_weight))
        print(f"{out_f} x {in_f}: {seconds:.1f} s, peak {peak:+d} MB above the start")


if __name__ == "__main__":
    main()
