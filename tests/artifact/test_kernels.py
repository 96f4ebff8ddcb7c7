"""`runtime.Packed`, a quantized tensor kept as stored: its NF4 and 8-bit codes go to
bitsandbytes' kernels where it is installed (its layout is svdq's `bnb` grid) and compute what
the torch de-quantizer computes; lookups read exactly the rows asked for."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from svdq import runtime
from svdq.algo import quant


def packed(w: torch.Tensor, bits: int, grid: str = "bnb", block: int = 64
           ) -> tuple[runtime.Packed, torch.Tensor]:
    """`w` quantized on `grid` and held as a loader holds it; and the quantizer's own
    de-quantized values."""
    books = nn.Module()
    for b in (4, 8):
        books.register_buffer(str(b), quant.codebook(b))
    q = quant.quantize(w, bits, block, grid=grid)
    p = runtime.Packed(tuple(w.shape), bits, block, grid, books)
    for key, t in q.tensors("t").items():
        name = key.rpartition(".")[2]
        setattr(p, name, t.reshape(getattr(p, name).shape))
    return p, q.dequantize()


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_kernels_compute_what_the_torch_path_computes(bits):
    pytest.importorskip("bitsandbytes")
    p, _ = packed(torch.randn(96, 192, generator=torch.Generator().manual_seed(bits)), bits)
    assert p._kernels() is not None  # rows of whole blocks: the CPU backend takes them
    torch_path = p.rows(0, p.shape[0])
    assert torch.equal(p.full(), torch_path)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for tokens in (1, 9):
            x = torch.randn(2, tokens, 192, generator=torch.Generator().manual_seed(tokens)).to(dtype)
            y, expect = p.matmul(x).float(), x.float() @ torch_path.T
            assert y.shape == expect.shape
            assert (y - expect).norm() <= tol * expect.norm(), (dtype, tokens)


def test_rows_of_partial_blocks_keep_the_torch_path_on_the_cpu():
    """bitsandbytes' CPU 4-bit de-quantizer disagrees with the layout when a row is not whole
    blocks (96 × 160 in blocks of 64): those stay on svdq's own de-quantizer."""
    p, _ = packed(torch.randn(96, 160, generator=torch.Generator().manual_seed(0)), 4)
    assert p._kernels() is None


def test_a_packed_table_looks_up_the_rows_it_holds():
    """`Packed.lookup` equals the whole table de-quantized, on both grids and every width it
    takes (the integer grid with a partial last group)."""
    w = torch.randn(37, 80, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[0, 36, 5], [5, 17, 2]])
    for grid, bits in (("int", 2), ("int", 4), ("int", 8), ("bnb", 4), ("bnb", 8)):
        p, values = packed(w, bits, grid, block=32)
        full = p.full()
        assert torch.equal(full, values)
        assert torch.equal(p.lookup(ids), full[ids]), (grid, bits)


int4 = pytest.mark.skipif(not runtime._int4_rows(),
                          reason="this torch has no int4 CPU kernel with a known layout")


@int4
@pytest.mark.parametrize("shape,group", [((1040, 256), 64), ((96, 128), 32), ((64, 512), 128)])
def test_int4_codes_run_through_torch_kernel_in_bfloat16(shape, group):
    """4-bit integer codes multiply bfloat16 activations through torch's int4 CPU kernel
    (whole blocks of its layout and a partial one: 1040 = 16 × 64 + 16), within bfloat16's
    rounding of the de-quantized product; the codes then sit in the kernel's layout, and
    still give the same de-quantized tensor and state dict, bit for bit."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(group))
    p, values = packed(w, 4, "int", block=group)
    stored = {k: v.clone() for k, v in p.state_dict().items()}
    x = torch.randn(2, 7, shape[1], generator=torch.Generator().manual_seed(1))
    before = p.matmul(x)
    y = p.matmul(x.bfloat16())
    assert p.layout == runtime._int4_rows()  # moved into the kernel's layout, in place
    assert p.codes.numel() == stored["codes"].numel()  # the same bytes: no second copy
    assert y.dtype == torch.bfloat16 and y.shape == before.shape
    assert (y.float() - before).norm() <= 1e-2 * before.norm()
    assert torch.equal(p.full(), values)  # de-quantized from the new layout: the same values
    assert (p.matmul(x) - before).norm() <= 1e-6 * before.norm()  # float32: not the kernel
    long = torch.randn(300, shape[1], generator=torch.Generator().manual_seed(2))
    assert (p.matmul(long.bfloat16()).float() - long @ values.T).norm() \
        <= 1e-2 * (long @ values.T).norm()  # more than INT4_TOKENS: a band de-quantized
    for key, t in p.state_dict().items():
        assert torch.equal(t, stored[key]), key
    assert not copy.deepcopy(p).to("meta")._int4_kernel()  # moved off the CPU: not the kernel
    p.load_state_dict(stored)  # codes loaded back come in the artifact's layout
    assert p.layout == 0 and torch.equal(p.full(), values)


@int4
def test_int4_kernel_is_only_used_where_it_applies():
    """Float32 activations, a partial group per row, rows not a multiple of 16, and other
    widths keep svdq's de-quantizer (and the codes their layout)."""
    cases = [((64, 256), 4, 64, torch.float32), ((64, 160), 4, 64, torch.bfloat16),
             ((72, 256), 4, 64, torch.bfloat16), ((64, 256), 3, 64, torch.bfloat16),
             ((64, 256), 8, 64, torch.bfloat16)]
    for shape, bits, group, dtype in cases:
        p, values = packed(torch.randn(*shape, generator=torch.Generator().manual_seed(0)),
                           bits, "int", block=group)
        x = torch.randn(3, shape[1]).to(dtype)
        y = p.matmul(x)
        assert p.layout == 0, (shape, bits, dtype)
        assert (y.float() - x.float() @ values.T).norm() <= 1e-2 * (x.float() @ values.T).norm()


@int4
def test_a_table_in_the_int4_layout_still_looks_up_its_rows():
    """A 4-bit embedding whose tied head ran through the int4 kernel (its codes now in the
    kernel's layout, a partial block at the end) looks up the same rows as before."""
    w = torch.randn(1040, 128, generator=torch.Generator().manual_seed(3))
    p, values = packed(w, 4, "int", block=64)
    ids = torch.tensor([[0, 1039, 31, 32], [63, 64, 1024, 1033]])
    before = p.lookup(ids)
    p.matmul(torch.randn(1, 128).bfloat16())
    assert p.layout
    assert torch.equal(p.lookup(ids), before) and torch.equal(before, values[ids])
    every = torch.arange(1040)
    assert torch.equal(p.lookup(every), values)
