"""Benchmark: integer-grid de-quantization (what a layer kept as stored runs every forward)
and torch's CPU int4 kernel against de-quantizing and multiplying, on one thread; then the bitsandbytes
grids (NF4, blockwise 8-bit) kept as stored, through svdq's own de-quantizer and through
bitsandbytes' CPU kernels (what `runtime.Packed` uses where every row is whole blocks), with
a check of both against the quantizer, on rows of whole blocks and on rows that are not.

    python benchmarks/dequant_speed.py [--repeats 5]

Shapes are SmolLM2's MLP weights (1536 × 576 and 576 × 1536); x is 512 tokens (prefill) or
one (decode), 1 to 1024 for the int4 kernel. Every de-quantized weight is checked against (code − zero) · scale per column.
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
    int4_kernel(args.repeats, gen)
    bnb_grids(args.repeats, gen)


def int4_kernel(repeats: int, gen: torch.Generator) -> None:
    """A 4-bit integer layer kept as stored (`runtime.Packed`): torch's int4 kernel against
    the band de-quantizer and a matmul, in bfloat16 at each token count (where `INT4_TOKENS`
    comes from) and in float32 at a few; the kernel's product checked against the other."""
    from svdq import runtime
    from svdq.algo import quant

    if not runtime._int4_rows():
        print("int4 kernel: not usable with this torch")
        return
    for out_f, in_f in [(1536, 576), (576, 1536)]:
        w = torch.randn(out_f, in_f, generator=gen) * 0.02
        q = quant.quantize(w, 4, 64, "int")
        p = runtime.Packed((out_f, in_f), 4, 64, "int", None)
        p.load_state_dict({"codes": q.codes, "scales": q.scales.view(out_f, -1),
                           "zeros": q.zeros}, assign=True)
        assert p._int4_kernel()  # codes in the kernel's layout from here on
        zeros = runtime._unpack_bytes(p.zeros, out_f * in_f // 64, 4).view(out_f, -1).float()
        sz32 = runtime._scales_and_zeros(p.scales.float(), zeros).float()  # Packed never does this
        for dt, counts in ((torch.bfloat16, (1, 16, 32, 64, 96, 128, 256, 1024)),
                           (torch.float32, (1, 16))):
            line = f"int4 g64 {out_f}×{in_f} {str(dt).removeprefix('torch.')}:"
            for tokens in counts:
                x = torch.randn(tokens, in_f, generator=gen).to(dt)
                ref = x.float() @ p.rows(0, out_f).T

                def kernel_mm(x=x):
                    if x.dtype == torch.bfloat16:
                        return runtime._int4_matmul(p, x)
                    return torch.ops.aten._weight_int4pack_mm_for_cpu(
                        x, p.codes.view(out_f, in_f // 2), 64, sz32)
                assert (kernel_mm().float() - ref).norm() <= 1e-2 * ref.norm()
                kernel = timed(kernel_mm, repeats)
                band = timed(lambda: x @ p.rows(0, out_f).to(dt).T, repeats)
                line += f" {tokens} tokens kernel {kernel:.2f} / de-quantize {band:.2f} ms;"
            print(line.rstrip(";"))


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
