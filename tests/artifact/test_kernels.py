"""Kept NF4 and 8-bit codes run through bitsandbytes' kernels where it is installed (its
layout is svdq's `bnb` grid): the same numbers as the torch de-quantizer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from svdq import runtime
from svdq.algo import quant


def packed(w: torch.Tensor, bits: int) -> runtime.Packed:
    books = nn.Module()
    for b in (4, 8):
        books.register_buffer(str(b), quant.codebook(b))
    q = quant.quantize(w, bits, 64)
    p = runtime.Packed(tuple(w.shape), bits, 64, "bnb", books)
    p.codes, p.absmax = q.data, q.absmax
    return p


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_kernels_compute_what_the_torch_path_computes(bits):
    pytest.importorskip("bitsandbytes")
    w = torch.randn(96, 192, generator=torch.Generator().manual_seed(bits))
    p = packed(w, bits)
    assert p._kernels() is not None  # rows of whole blocks: the CPU backend takes them
    torch_path = p.rows(0, w.shape[0])
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
    p = packed(torch.randn(96, 160, generator=torch.Generator().manual_seed(0)), 4)
    assert p._kernels() is None
