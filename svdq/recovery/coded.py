"""Quantization-aware fine-tuning of stored codes (`svdq finetune --train-codes`).

`Scaled` trains a quantized tensor's scales and keeps its codes. `Coded` trains the values
themselves, as quantization-aware training does (EfficientQAT's end-to-end stage trains the
scales alone; its block stage trains weights and scales together, as here): a float32
latent copy starts at the stored values, counted in grid steps of their scale, and each
forward rounds it to the nearest point of the tensor's own grid — the integer grid's codes
less the group's zero point, or bitsandbytes' codebook — times the current scales (per
group, or the absmax per block), passing the gradient straight through the rounding (it
stops where a value lies beyond the grid's ends); the scales train as in `Scaled`. The zero
points stay. `settle` rounds the scales to their stored precision
and the latent values to the codes they round to, so the module then computes exactly what
`tensors` writes: the same keys, shapes, dtypes and bytes, other codes.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from svdq import runtime
from svdq.algo import quant


_BOOKS: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def book(bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bitsandbytes code values of `bits` sorted, the midpoints between neighbours, and
    each sorted value's code."""
    if bits not in _BOOKS:
        values, order = quant.codebook(bits).sort()
        _BOOKS[bits] = values, (values[1:] + values[:-1]) / 2, order.to(torch.uint8)
    return _BOOKS[bits]


class Coded(nn.Module):
    def __init__(self, packed: runtime.Packed):
        super().__init__()
        self.grid, self.shape, self.block, self.bits = (packed.grid, tuple(packed.shape),
                                                       packed.block, packed.bits)
        rows, cols = self.shape if len(self.shape) == 2 else (1, self.shape[0])
        if packed.grid == "int":
            groups = -(-cols // packed.block)
            zeros = runtime.unpack(packed.zeros, rows * groups, packed.bits).view(rows, groups)
            self.register_buffer("zero", zeros.float())
            scale, self.dtype = packed.scales.float().reshape(rows, groups), torch.float16
            start = runtime.dequantize_int(packed.svdq_codes(), packed.scales, packed.zeros,
                                           self.shape, packed.block, packed.bits)
        else:
            values, mids, order = book(packed.bits)
            self.register_buffer("values", values.clone())
            self.register_buffer("mids", mids.clone())
            self.register_buffer("order", order.clone())
            scale, self.dtype = packed.absmax.float().reshape(-1), torch.float32
            start = runtime.dequantize(packed.codes, packed.absmax, packed.books.get_buffer(
                str(packed.bits)), self.shape, packed.block, packed.bits)
        self.register_buffer("scale0", scale.clone())
        self.delta = nn.Parameter(torch.zeros_like(scale))  # log-multiplier, as Scaled's
        # the latent values count grid steps (the integer grid's 1, the codebook's mean gap),
        # so one learning rate is one fraction of a step for every tensor, at any scale or width
        self.step = 1.0 if packed.grid == "int" else float(
            (self.values[-1] - self.values[0]) / (self.values.numel() - 1))
        tiny = torch.finfo(torch.float32).tiny  # (an all-zero block's absmax is 0)
        self.latent = nn.Parameter(start.float() / (self._each(scale).clamp_min(tiny) * self.step))

    def scale(self) -> torch.Tensor:
        return self.scale0 * self.delta.exp()

    def _each(self, s: torch.Tensor) -> torch.Tensor:
        """A per-group or per-block `s` expanded to one value per element of the tensor."""
        if self.grid == "int":
            return s.repeat_interleave(self.block, dim=1)[:, :self.shape[-1]].reshape(self.shape)
        n = math.prod(self.shape)
        return s.repeat_interleave(self.block)[:n].view(self.shape)

    def _nearest(self, x: torch.Tensor) -> torch.Tensor:
        """The grid point nearest each `x` (in units of the scale), as an index: the code on
        the integer grid, the position in the sorted codebook on bitsandbytes'."""
        if self.grid == "int":
            z = self._each(self.zero)
            return torch.clamp(torch.round(x) + z, 0, (1 << self.bits) - 1)
        return torch.bucketize(x.clamp(self.values[0], self.values[-1]), self.mids)

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        """The grid point nearest each `x` (in units of the scale), in units of the scale."""
        if self.grid == "int":  # the code clamped to the grid, less the zero point
            z = self._each(self.zero)
            return torch.clamp(torch.round(x), -z, (1 << self.bits) - 1 - z)
        return self.values[self._nearest(x)]

    def value(self) -> torch.Tensor:
        """The grid point nearest each latent value times its scale. The scales' gradient is
        that of `Scaled` (the codes held), so with the latent values still the two train
        alike; the latent values' is the identity (straight through the rounding), zero
        where a value lies beyond the grid's ends."""
        s = self._each(self.scale())
        x = self.latent.detach() * self.step
        grid = self._grid(x)
        if self.grid == "int":  # beyond the ends: the code clamped, not the nearest
            inside = (x - grid).abs() <= 0.5
        else:
            inside = (x >= self.values[0]) & (x <= self.values[-1])
        slope = s.detach() * self.step * inside
        return grid * s + (self.latent - self.latent.detach()) * slope

    @torch.no_grad()
    def settle(self) -> None:
        """The scales as stored, the latent values on their grid points."""
        self.scale0.copy_(self.scale().to(self.dtype).float())
        self.delta.zero_()
        self.latent.copy_(self._grid(self.latent * self.step) / self.step)

    @torch.no_grad()
    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The codes and scales under `key`, as the artifact stores them (call `settle` first)."""
        s = self.scale().to(self.dtype)
        idx = self._nearest(self.latent * self.step)
        if self.grid == "int":
            rows = self.shape[0] if len(self.shape) == 2 else 1
            return quant.int_quantized(idx.long().view(rows, -1), s, self.zero.long(), self.bits,
                                       self.block).tensors(key)
        codes = self.order[idx].reshape(-1)
        if self.bits == 4:  # two codes a byte, the first element in the high nibble
            codes = nn.functional.pad(codes, (0, codes.numel() % 2)).view(-1, 2)
            codes = (codes[:, 0] << 4) | codes[:, 1]
        return {key + runtime.CODES: codes.contiguous(), key + runtime.ABSMAX: s.contiguous()}
