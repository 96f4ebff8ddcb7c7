"""What fine-tuning trains in a loaded artifact, and the stored tensors it gives back.

A `StoredLinear` becomes a `TunedLinear`: its quantized dense part (if any) de-quantized once
and frozen, its low-rank factors Uᵀ, Vᵀ and Σ trainable float32 parameters started from the
stored values, its bias trainable. In the forward the factors pass through the grid they are
stored on (`fake_quant`: nearest code per block of the flattened factor, the gradient passed
straight through), so the loss that training sees is the loss of what will be stored.
`stored_tensors` quantizes them again at the end under the artifact's keys, at the same bits
and block size: the stored bytes do not change.

Everywhere else only the norms' weights and biases and the biases of linear layers train.
"""
from __future__ import annotations

import torch
from torch import nn

from svdq import runtime
from svdq.algo import quant

_BOOKS: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _book(bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The code values of `bits` sorted, the midpoints between neighbours, and each sorted
    value's code."""
    if bits not in _BOOKS:
        values, order = quant.codebook(bits).sort()
        _BOOKS[bits] = values, (values[1:] + values[:-1]) / 2, order.to(torch.uint8)
    return _BOOKS[bits]


@torch.no_grad()
def grid_quant(t: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """(codes, absmax, de-quantized) of `t` on the bnb grid at 4 or 8 bits: per block of the
    flattened tensor the scale that puts its largest positive value on the largest code or its
    most negative on the smallest, whichever needs more, then the nearest code. That is
    bitsandbytes' absmax for the symmetric NF4 codes; for the 8-bit codes (−0.993 … 1) it
    makes quantizing a de-quantized tensor again give the same codes, which bitsandbytes'
    max |x| does not (it rescales every block whose extreme is negative)."""
    values, mids, order = _book(bits)
    values, mids = values.to(t.device), mids.to(t.device)
    flat = t.detach().float().reshape(-1)
    blocks = nn.functional.pad(flat, (0, -flat.numel() % block)).view(-1, block)
    absmax = torch.maximum(blocks.amax(1) / values[-1], blocks.amin(1) / values[0])
    absmax = absmax.clamp(min=torch.finfo(torch.float32).tiny)
    idx = torch.bucketize(blocks / absmax[:, None], mids)
    deq = (values[idx] * absmax[:, None]).view(-1)[: flat.numel()].view_as(t)
    return order.to(t.device)[idx].view(-1)[: flat.numel()], absmax, deq


def fake_quant(t: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """`t` as it will be stored (`stored_factor`), with the gradient of the identity
    (straight-through)."""
    with torch.no_grad():
        q = t.to(torch.float16).float() if bits == 16 else grid_quant(t, bits, block)[2]
    return t + (q - t).detach()


def stored_factor(t: torch.Tensor, bits: int, block: int) -> quant.Quantized:
    """A factor quantized for the artifact: `grid_quant`'s codes (NF4 packed by
    bitsandbytes, whose nibble order the loaders read; its codes are the same)."""
    if bits in (4, 16):
        return quant.quantize(t, bits, block)
    codes, absmax, _ = grid_quant(t, bits, block)
    return quant.Quantized(codes.cpu().contiguous(), absmax.float().cpu().contiguous(),
                           tuple(t.shape), bits, block)


class TunedLinear(nn.Module):
    """A stored layer being fine-tuned: frozen dense part + trainable U Σ Vᵀ + trainable bias."""

    def __init__(self, layer: runtime.StoredLinear, entry: dict):
        super().__init__()
        self.entry, self.kind, self.rank = entry, layer.kind, layer.rank
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.fbits = entry.get("factor_bits", entry["bits"]) if self.rank else None
        self.block, self.qat = entry["block_size"], True
        dense = None
        if layer.kind != "lowrank":
            w = layer._dense()
            dense = w.full() if isinstance(w, runtime.Packed) else w.float()
        self.register_buffer("dense", dense)
        if self.rank:
            self.u = nn.Parameter(layer.factor("u").clone())
            self.v = nn.Parameter(layer.factor("v").clone())
            self.s = nn.Parameter(layer.svdq.s.detach().float().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone())
        self.bias_dtype = None if layer.bias is None else layer.bias.dtype

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.qat:
            return self.u, self.v
        return (fake_quant(self.u, self.fbits, self.block),
                fake_quant(self.v, self.fbits, self.block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        y = None if self.dense is None else x @ self.dense.T
        if self.rank:
            u, v = self.factors()
            low = ((x @ v.T) * self.s) @ u
            y = low if y is None else y + low
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def settle(self) -> None:
        """Round the trained values to what `stored_tensors` writes, and stop fake-quantizing:
        the module then computes exactly what the fine-tuned artifact loads as."""
        if self.rank:
            for name in ("u", "v"):
                p = getattr(self, name)
                p.copy_(stored_factor(p, self.fbits, self.block).dequantize())
        if self.bias is not None:
            self.bias.copy_(self.bias.to(self.bias_dtype).float())
        self.qat = False

    @torch.no_grad()
    def stored_tensors(self, version: int) -> dict[str, torch.Tensor]:
        """The trained tensors under the artifact's keys, quantized as the plan stores them."""
        key = runtime.keys(self.entry["name"], version)
        out = {}
        if self.rank:
            for name in ("u", "v"):
                q = stored_factor(getattr(self, name), self.fbits, self.block)
                out.update(q.tensors(key[name]))
            out[key["s"]] = self.s.detach().float().contiguous()
        if self.bias is not None:
            out[key["bias"]] = self.bias.detach().to(self.bias_dtype).contiguous()
        return out


def is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def prepare(model: nn.Module, manifest: dict) -> dict[str, nn.Parameter]:
    """Swap every StoredLinear of `model` for a TunedLinear, freeze everything else but norms
    and biases; returns the trainable parameters by their artifact key (tensors of the tuned
    layers excepted: `stored_tensors` gives those)."""
    plan = {p["name"]: p for p in manifest["layers"]}
    for name, module in list(model.named_modules()):
        if isinstance(module, runtime.StoredLinear):
            runtime.set_module(model, name, TunedLinear(module, plan[name]))
    if hasattr(model, "svdq"):
        del model.svdq  # the codebooks: the tuned layers hold float values
    model.float()
    for p in model.parameters():
        p.requires_grad_(False)
    plain = {}
    for name, module in model.named_modules():
        if isinstance(module, TunedLinear):
            for p in module.parameters():
                p.requires_grad_(True)
            continue
        for pname, p in module.named_parameters(recurse=False):
            if is_norm(module) or pname == "bias":
                p.requires_grad_(True)
                plain[f"{name}.{pname}" if name else pname] = p
    return plain
