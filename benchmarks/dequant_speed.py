"""Benchmark: integer-grid de-quantization (what a layer kept as stored runs every forward)
and torch's CPU int4 kernel, against a float32 matmul, on one thread; then the bitsandbytes
grids (NF4, blockwise 8-bit) kept as stored, through svdq's own de-quantizer and through
bitsandbytes' CPU kernels (what `runtime.Packed` uses where every row is whole blocks), with
a check of both against the quantizer, on rows of whole blocks and on rows that are not.

    python benchmarks/dequant_speed.py [--repeats 5]

Shapes are SmolLM2's MLP weights (1536 × 576 and 576 × 1536); x is 512 tokens (prefill) or
one (decode). Every de-quantized weight is checked against (code − zero) · scale per column.
Run it from another checkout (`PYTHONPATH=OTHER python benchmarks/dequant_speed.py`) to time
that checkout's de-quantizer.
"""
from __future__ import annotations

import argparse
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from svdq import runtime
    from svdq.algo import quant

    print(f"svdq from {runtime.__file__}, torch {torch.__version__}, 1 thread")
    gen = torch.Generator().manual_seed(0)
    for bits, group, (out_f, in_f) in [(4, 64, (1536, 576)), (3, 64, (1536, 576)),
                                       (2, 64, (576, 1536)), (8, 64, (576, 1536)),
                                       (4, 128, (1536, 576))]:
        groups = -(-in_f // group)
        q = torch.randint(0, 1 << bits, (out_f * in_f,), generator=gen)
        z = torch.randint(0, 1 << bits, (out_f * groups,), generator=gen)
        s = torch.rand(out_f, groups, generator=gen).half()
        codes, zeros = quant.pack(q, bits), quant.pack(z, bits)
        col = torch.arange(in_f) // group
        ref = (q.view(out_f, in_f).float() - z.view(out_f, groups).float()[:, col]) * s.float()[:, col]
        got = runtime.dequantize_int(codes, s, zeros, (out_f, in_f), group, bits)
        assert torch.equal(got, ref)
        ms = timed(lambda: runtime.dequantize_int(codes, s, zeros, (out_f, in_f), group, bits), args.repeats)
        print(f"int{bits} group {group} {out_f}×{in_f}: de-quantize {ms:.2f} ms")
    out_f, in_f, group = 1536, 576, 64
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    q = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32, generator=gen)
    scale = torch.rand(out_f, in_f // group, generator=gen) * 0.01
    zero = torch.randint(0, 16, (out_f, in_f // group), generator=gen).float()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([scale.T, ((8 - zero) * scale).T], dim=-1).contiguous()
    for tokens in (512, 1):
        x = torch.randn(tokens, in_f, generator=gen)
        dense = timed(lambda: x @ w.T, args.repeats)
        line = f"{tokens} tokens through {out_f}×{in_f}: float32 matmul {dense:.2f} ms"
        for dt in (torch.bfloat16, torch.float32):
            xd, szd = x.to(dt), sz.to(dt)
            k = timed(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xd, packed, group, szd),
                      max(1, args.repeats // (5 if dt == torch.float32 else 1)))
            line += f", int4 kernel {str(dt).removeprefix('torch.')} {k:.2f} ms"
        print(line)
    bnb_grids(args.repeats, gen)


def bnb_grids(repeats: int, gen: torch.Generator) -> None:
    from torch import nn

    from svdq import runtime
    from svdq.algo import quant

    books = nn.Module()
    for b in (4, 8):
        books.register_buffer(str(b), quant.codebook(b))
    for bits, shape in [(4, (1536, 576)), (8, (1536, 576)), (4, (96, 160))]:
        w = torch.randn(*shape, generator=gen)
        q = quant.quantize(w, bits, 64)
        p = runtime.Packed(shape, bits, 64, "bnb", books)
        p.codes, p.absmax = q.data, q.absmax
        bnb = runtime._bnb()
        exact = torch.equal(runtime._bnb_dequantize(bnb, p, torch.float32), q.dequantize())
        line = f"bnb {bits}-bit {shape[0]}×{shape[1]} blocks of 64: bitsandbytes equals the quantizer: {exact}"
        if p._kernels() is None:
            print(line + " (Packed keeps svdq's own de-quantizer here)")
            continue
        for tokens in (1, 512):
            x = torch.randn(tokens, shape[1], generator=gen)
            own = timed(lambda: x @ p.rows(0, shape[0]).T, repeats)
            kernel = timed(lambda: runtime._bnb_matmul(bnb, p, x), repeats)
            line += f"; {tokens} tokens: svdq de-quantize + matmul {own:.2f} ms, bitsandbytes {kernel:.2f} ms"
        print(line)


if __name__ == "__main__":
    main()
