"""Blockwise quantization of weights and factors, and their exact stored size.

| bits | storage                               | bytes for n elements, block B       |
|------|---------------------------------------|-------------------------------------|
| 16   | float16                               | 2n                                  |
| 8    | bitsandbytes dynamic 8-bit codes      | n + 4·ceil(n/B)   (float32 absmax)  |
| 4    | bitsandbytes NF4 codes, 2 per byte    | ceil(n/2) + 4·ceil(n/B)             |

Quantizing goes through bitsandbytes' functional quantizers; de-quantizing is the pure-torch
`svdq.runtime.dequantize`, the same code the standalone loader runs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from svdq.runtime import ABSMAX, CODES, dequantize

BITS = (4, 8, 16)


@dataclass(frozen=True)
class Quantized:
    """A tensor as stored: `data` is float16 (16 bits) or codes with per-block `absmax`."""

    data: torch.Tensor
    absmax: torch.Tensor | None
    shape: tuple[int, ...]
    bits: int
    block_size: int

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The safetensors entries of this tensor under `key`."""
        if self.absmax is None:
            return {key: self.data}
        return {key + CODES: self.data, key + ABSMAX: self.absmax}

    def dequantize(self) -> torch.Tensor:
        if self.absmax is None:
            return self.data.float()
        return dequantize(self.data, self.absmax, codebook(self.bits), self.shape,
                          self.block_size, self.bits)


def _bnb():
    """bitsandbytes.functional, imported without its warning about optional CPU GEMM kernels
    (svdq quantizes with bitsandbytes but never runs its matmuls)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes.functional

    return bitsandbytes.functional


def codebook(bits: int) -> torch.Tensor:
    """The code values bitsandbytes uses for `bits` (stored once per artifact)."""
    bnbf = _bnb()

    if bits == 8:
        return bnbf.create_dynamic_map(signed=True).float()
    if bits == 4:
        return bnbf.get_4bit_type("nf4", device="cpu").float()
    raise ValueError(f"no codebook for {bits} bits")


def quantize(w: torch.Tensor, bits: int, block_size: int) -> Quantized:
    """Quantize `w` (any shape, any float dtype) at `bits` with one absmax per block."""
    shape = tuple(w.shape)
    if bits == 16:
        return Quantized(w.detach().to(torch.float16).contiguous(), None, shape, 16, block_size)
    bnbf = _bnb()

    w = w.detach().float().contiguous()
    if bits == 8:
        codes, state = bnbf.quantize_blockwise(w, blocksize=block_size)
    elif bits == 4:
        codes, state = bnbf.quantize_4bit(w, blocksize=block_size, quant_type="nf4")
    else:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return Quantized(codes.reshape(-1).cpu(), state.absmax.float().cpu(), shape, bits, block_size)


def nbytes(numel: int, bits: int, block_size: int) -> int:
    """Exact bytes of `numel` elements stored at `bits` (codes plus per-block absmax)."""
    if bits == 16:
        return 2 * numel
    codes = numel if bits == 8 else (numel + 1) // 2
    return codes + 4 * math.ceil(numel / block_size)
