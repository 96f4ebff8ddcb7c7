"""`runtime.Packed`, a quantized tensor kept as stored: its NF4 and 8-bit codes go to
bitsandbytes' kernels where it is installed (its layout is svdq's `bnb` grid) and compute what
the torch de-quantizer computes; lookups read exactly the rows asked for."""
from __future__ import annotations

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
