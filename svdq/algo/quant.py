"""Quantized tensors on the grids svdq stores, and their exact stored size.

| grid | bits       | storage                                     | bytes, n elements (out × in)        |
|------|------------|---------------------------------------------|-------------------------------------|
| bnb  | 16         | float16                                     | 2n                                  |
| bnb  | 8          | bitsandbytes dynamic 8-bit codes            | n + 4·ceil(n/B) (float32 absmax)    |
| bnb  | 4          | bitsandbytes NF4 codes, 2 per byte          | ceil(n/2) + 4·ceil(n/B)             |
| int  | 2, 3, 4, 8 | uniform asymmetric codes, packed bit stream | ceil(n·b/8) + per group of B columns|
|      |            | per group: float16 scale, b-bit zero point  | of a row: 2 + b/8 (zeros packed)    |

bnb blocks run over the flattened tensor; integer groups run along each row's input columns
(the last group of a row is shorter when B does not divide `in`) — the layout GPTQ, AWQ,
HQQ and compressed-tensors share. Quantizing the bnb grids goes through bitsandbytes;
de-quantizing every grid is `svdq.runtime`'s pure-torch code, the same the standalone
loader runs, so what is measured here is what loads.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import torch

from svdq.runtime import (ABSMAX, CODES, INT_BITS, SCALES, ZEROS, dequantize, dequantize_int,
                          int_bytes)

BITS = (4, 8, 16)  # the bnb grid's widths
GRIDS = ("bnb", "int")


@dataclass(frozen=True)
class Quantized:
    """A tensor as stored on the bnb grid: `data` is float16 (16 bits) or codes with per-block
    `absmax`."""

    data: torch.Tensor
    absmax: torch.Tensor | None
    shape: tuple[int, ...]
    bits: int
    block_size: int
    # where the tensor was quantized (--device): de-quantized there, while what is stored rests
    # on the CPU until it is written
    device: torch.device = field(default=torch.device("cpu"), compare=False)
    grid = "bnb"

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The safetensors entries of this tensor under `key`."""
        if self.absmax is None:
            return {key: self.data}
        return {key + CODES: self.data, key + ABSMAX: self.absmax}

    def dequantize(self) -> torch.Tensor:
        """The tensor as the loaders compute it, float32, on `device`."""
        if self.absmax is None:
            return self.data.to(self.device).float()
        return dequantize(self.data.to(self.device), self.absmax.to(self.device),
                          codebook(self.bits).to(self.device), self.shape, self.block_size,
                          self.bits)


@dataclass(frozen=True)
class IntQuantized:
    """An (out, in) weight on the uniform integer grid: packed codes, a float16 scale and a
    packed zero point per group of `block_size` columns of a row."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    shape: tuple[int, int]
    bits: int
    block_size: int
    device: torch.device = field(default=torch.device("cpu"), compare=False)  # as Quantized's
    grid = "int"

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        return {key + CODES: self.codes, key + SCALES: self.scales, key + ZEROS: self.zeros}

    def dequantize(self) -> torch.Tensor:
        """The weight as the loaders compute it, float32, on `device`."""
        return dequantize_int(self.codes.to(self.device), self.scales.to(self.device),
                              self.zeros.to(self.device), self.shape, self.block_size, self.bits)


@functools.cache
def _bnb():
    """bitsandbytes.functional, imported without its warning about optional CPU GEMM kernels
    (svdq quantizes with bitsandbytes but never runs its matmuls). Once: a logger's setLevel
    clears every logger's cache (3,300 calls were 1.1 s of a SmolLM2 --fast budget)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes.functional

    return bitsandbytes.functional


def codebook(bits: int) -> torch.Tensor:
    """The code values bitsandbytes uses for `bits` (stored once per artifact): a copy of
    `_codebook`'s, which bitsandbytes makes once."""
    return _codebook(bits).clone()


@functools.cache
def _codebook(bits: int) -> torch.Tensor:
    bnbf = _bnb()
    if bits == 8:
        return bnbf.create_dynamic_map(signed=True).float()
    if bits == 4:
        return bnbf.get_4bit_type("nf4", device="cpu").float()
    raise ValueError(f"no codebook for {bits} bits")


PACK_CHUNK = 1 << 20  # values per step of packing and unpacking: int64 temporaries of 8 MB


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [0, 2^bits) into a little-endian bit stream of bytes (`runtime.unpack`):
    value i at bits [i·bits, (i+1)·bits). Eight values fill `bits` whole bytes, so they are
    packed eight at a time into one 64-bit word and split into its low `bits` bytes."""
    flat = values.reshape(-1)
    n = flat.numel()
    out = torch.empty(-(-n // 8) * bits, dtype=torch.uint8)
    shifts, bytes_ = torch.arange(8) * bits, torch.arange(bits) * 8
    for i in range(0, n, PACK_CHUNK):  # PACK_CHUNK is a multiple of 8
        v = flat[i:i + PACK_CHUNK].cpu().long()
        v = torch.nn.functional.pad(v, (0, (-v.numel()) % 8)).view(-1, 8)
        word = (v << shifts).sum(1)  # disjoint bit fields: the sum is an OR
        part = ((word[:, None] >> bytes_) & 0xFF).reshape(-1)
        out[i // 8 * bits: i // 8 * bits + part.numel()] = part
    return out[:-(-n * bits // 8)]


def int_params(w: torch.Tensor, bits: int, group: int, weights: torch.Tensor | None = None,
               shrinks: int = 10, rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of `group` columns of each row: a float16 scale and an integer zero point
    ((out, groups) each) for the range [min, max] of the group, both clamped to include 0
    and shrunk toward 0 by up to 25% where that lowers the group's squared rounding error
    (weighted per column by `weights`, e.g. the input energies diag XᵀX, when given).
    `rows` rows at a time: the search's temporaries stay a few MB at any width."""
    out_f, in_f = w.shape
    groups, top = -(-in_f // group), (1 << bits) - 1
    cw = None if weights is None else torch.nn.functional.pad(
        weights.float(), (0, groups * group - in_f)).view(1, groups, group)
    scales, zeros = [], []
    for r in range(0, out_f, rows):
        part = w[r:r + rows].float()
        wp = torch.nn.functional.pad(part, (0, groups * group - in_f)).view(-1, groups, group)
        lo, hi = wp.amin(-1).clamp(max=0), wp.amax(-1).clamp(min=0)
        best = None
        for k in range(shrinks if shrinks > 1 else 1):
            p = 1.0 - 0.25 * k / max(shrinks - 1, 1)
            # an all-zero group (a padding row) would round its float16 scale to 0: the least
            # float16 above 0 instead (its codes are then the zero point, exactly 0 back)
            scale = ((hi - lo) * p / top).half().float().clamp_min(2 ** -24)
            zero = torch.round(-lo * p / scale).clamp(0, top)
            q = torch.clamp(torch.round(wp / scale[..., None]) + zero[..., None], 0, top)
            err = ((q - zero[..., None]) * scale[..., None] - wp).pow(2)
            err = (err if cw is None else err * cw).sum(-1)
            if best is None:
                best = (err, scale, zero)
            else:
                better = err < best[0]
                best = (torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
                        torch.where(better, zero, best[2]))
        scales.append(best[1].half())
        zeros.append(best[2].long())
    return torch.cat(scales), torch.cat(zeros)


def int_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
              group: int) -> torch.Tensor:
    """The nearest codes of `w` (out, in) on the grid given by per-group `scales`, `zeros`."""
    col = torch.arange(w.shape[1], device=w.device) // group
    s, z = scales.float()[:, col], zeros.float()[:, col]
    return torch.clamp(torch.round(w.float() / s) + z, 0, (1 << bits) - 1).long()


def int_quantized(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                  group: int) -> IntQuantized:
    return IntQuantized(pack(codes, bits), scales.half().cpu().contiguous(), pack(zeros, bits),
                        tuple(codes.shape), bits, group, codes.device)


def quantize(w: torch.Tensor, bits: int, block_size: int, grid: str = "bnb",
             weights: torch.Tensor | None = None) -> Quantized | IntQuantized:
    """Quantize `w` at `bits` by rounding to the nearest point of the grid: bnb (any shape;
    one absmax per block of the flattened tensor) or int (an (out, in) weight; per-group scale
    and zero point, `weights` weighing the columns in their choice)."""
    if grid == "int":
        if bits not in INT_BITS or w.dim() != 2:
            raise ValueError(f"the integer grid takes a 2-d weight at {INT_BITS} bits")
        scales, zeros = int_params(w, bits, block_size, weights)
        return int_quantized(int_codes(w, scales, zeros, bits, block_size), scales, zeros,
                             bits, block_size)
    shape = tuple(w.shape)
    if bits == 16:
        return Quantized(w.detach().to(torch.float16).cpu().contiguous(), None, shape, 16,
                         block_size, w.device)
    bnbf = _bnb()

    w = w.detach().float().contiguous()
    if bits == 8:
        codes, state = bnbf.quantize_blockwise(w, blocksize=block_size)
    elif bits == 4:
        codes, state = bnbf.quantize_4bit(w, blocksize=block_size, quant_type="nf4")
    else:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return Quantized(codes.reshape(-1).cpu(), state.absmax.float().cpu(), shape, bits, block_size,
                     w.device)


def nbytes(numel: int, bits: int, block_size: int) -> int:
    """Exact bytes of `numel` elements stored at `bits` on the bnb grid (codes plus absmax)."""
    if bits == 16:
        return 2 * numel
    codes = numel if bits == 8 else (numel + 1) // 2
    return codes + 4 * math.ceil(numel / block_size)


def weight_bytes(out_f: int, in_f: int, bits: int, block_size: int, grid: str = "bnb") -> int:
    """Exact bytes of an (out, in) weight stored at `bits` on `grid`."""
    if grid == "int":
        return sum(int_bytes(out_f, in_f, bits, block_size))
    return nbytes(out_f * in_f, bits, block_size)
