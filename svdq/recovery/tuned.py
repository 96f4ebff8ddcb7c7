"""What fine-tuning trains in a loaded artifact, and the stored tensors it gives back.

A `StoredLinear` becomes a `TunedLinear` that trains what its stored form holds in floating
point, so nothing is re-quantized and the bytes cannot change: the scales of every quantized
tensor (`Scaled`: the integer grid's float16 scale per group, bnb's float32 absmax per block —
of the dense weight and of the factors; the codes stay), Σ, and the bias. Scales and Σ train
as log-multipliers, so one learning rate is one relative step for all of them. A 16-bit
dense weight or 16-bit factors stay frozen. A sparse term's values (float16, `--sparse`) train
themselves, its positions stay; a layer storing some output rows (`--attention-product`) keeps
the others at zero.

With `factors` (`svdq finetune --train-factors`) the factors Uᵀ, Vᵀ train themselves instead,
in float32 through the grid they are stored on (`fake_quant`: the nearest code per block, the
gradient passed straight through), and `stored_tensors` quantizes them again at the same bits
and block size. Measured on SmolLM2 (benchmarks/RESULTS.md) that raised the held-out loss at
every learning rate that moved anything, which is why it is not the default.

With `codes` (`svdq finetune --train-codes`) every quantized tensor — dense weight and
factors — trains its values as well as its scales (`coded.Coded`) and is stored on the codes
it ends on.

Everywhere else only the norms' weights and biases and the biases of linear layers train, and
with `embedding` (`svdq finetune --train-embedding`) the token embedding and output head where
they are stored in float (a tied head is the embedding's own tensor): the bytes are the same,
its gradient and optimizer state for SmolLM2's 28 M embedding values 0.33 GB more.
"""
from __future__ import annotations

import torch
from torch import nn

from svdq import runtime
from svdq.algo import quant
from svdq.errors import SvdqError
from svdq.models import layers
from svdq.recovery.coded import Coded, book


@torch.no_grad()
def grid_quant(t: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """(codes, absmax, de-quantized) of `t` on the bnb grid at 4 or 8 bits: per block of the
    flattened tensor the scale that puts its largest positive value on the largest code or its
    most negative on the smallest, whichever needs more, then the nearest code. That is
    bitsandbytes' absmax for the symmetric NF4 codes; for the 8-bit codes (−0.993 … 1) it
    makes quantizing a de-quantized tensor again give the same codes, which bitsandbytes'
    max |x| does not (it rescales every block whose extreme is negative)."""
    values, mids, order = book(bits)
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
                           tuple(t.shape), bits, block, t.device)


class Scaled(nn.Module):
    """A quantized tensor whose codes stay and whose scales train (as PEQA trains them): the
    value is `base` — the codes at unit scale — times a scale per group (the integer grid:
    float16 per group of a row's columns) or per block (bnb: float32 absmax per block of the
    flattened tensor). The scales train as log-multipliers `delta` (0 at the start), so one
    learning rate is one relative step for scales of any size."""

    def __init__(self, packed: runtime.Packed):
        super().__init__()
        self.grid, self.shape, self.block = packed.grid, tuple(packed.shape), packed.block
        if packed.grid == "int":
            ones = torch.ones_like(packed.scales)
            base = runtime.dequantize_int(packed.svdq_codes(), ones, packed.zeros, self.shape,
                                          packed.block, packed.bits)
            scale, self.dtype = packed.scales.float().reshape(self.shape[0], -1), torch.float16
        else:
            book = packed.books.get_buffer(str(packed.bits))
            base = runtime.dequantize(packed.codes, torch.ones_like(packed.absmax), book,
                                      self.shape, packed.block, packed.bits)
            scale, self.dtype = packed.absmax.float().reshape(-1), torch.float32
        self.register_buffer("base", base)
        self.register_buffer("scale0", scale.clone())
        self.delta = nn.Parameter(torch.zeros_like(scale))

    def scale(self) -> torch.Tensor:
        return self.scale0 * self.delta.exp()

    def value(self) -> torch.Tensor:
        s = self.scale()
        if self.grid == "int":
            return self.base * s.repeat_interleave(self.block, dim=1)[:, :self.shape[1]]
        flat = self.base.reshape(-1)
        n = flat.numel()
        blocks = nn.functional.pad(flat, (0, -n % self.block)).view(-1, self.block)
        return (blocks * s[:, None]).reshape(-1)[:n].view(self.shape)

    @torch.no_grad()
    def settle(self) -> None:
        """The scales as stored (float16 on the integer grid)."""
        self.scale0.copy_(self.scale().to(self.dtype).float())
        self.delta.zero_()

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        name = runtime.SCALES if self.grid == "int" else runtime.ABSMAX
        return {key + name: self.scale().detach().to(self.dtype).contiguous()}


class SparseTerm(nn.Module):
    """A stored sparse term whose values train and whose positions stay: applied as the
    stored layer applies it (x Sᵀ by `torch.sparse.mm`, which passes gradients to the values);
    `values` in the order the artifact stores them (rows, then columns as written)."""

    def __init__(self, stored: nn.Module, shape: tuple[int, int]):
        super().__init__()
        at = runtime.sparse_coordinates(stored.cols, stored.rows, shape[0])
        order = (at[0] * shape[1] + at[1]).argsort()  # stored order → the coalesced (sorted) one
        self.register_buffer("order", order)
        self.register_buffer("indices", at[:, order])
        self.shape, self.dtype = shape, stored.values.dtype
        self.values = nn.Parameter(stored.values.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sparse_coo_tensor(self.indices, self.values[self.order], self.shape,
                                    is_coalesced=True, check_invariants=False)
        flat = x.reshape(-1, x.shape[-1]).float()
        return torch.sparse.mm(s, flat.T).T.reshape(*x.shape[:-1], self.shape[0])

    @torch.no_grad()
    def settle(self) -> None:
        self.values.copy_(self.values.to(self.dtype).float())


class TunedLinear(nn.Module):
    """A stored layer being fine-tuned. Trainable: the scales of its quantized parts (dense
    weight and factors; codes stay), Σ (as a log-multiplier, like the scales), the values of
    a sparse term and the bias.
    A 16-bit dense part stays frozen. With `factors` the factors U, V themselves train
    instead of their scales, in float through `fake_quant`, re-quantized at the end."""

    svdq_layer = True  # a target layer to `models.layers.blocks_of`

    def __init__(self, layer: runtime.StoredLinear, entry: dict, factors: bool = False,
                 codes: bool = False):
        super().__init__()
        self.entry, self.kind, self.rank = entry, layer.kind, layer.rank
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.conv = layer.conv  # a convolution's geometry, or None
        self.fbits = entry.get("factor_bits", entry["bits"]) if self.rank else None
        self.block, self.train_factors, self.qat = entry["block_size"], factors, True
        w = layer._dense() if layer.kind != "lowrank" else None
        if isinstance(w, runtime.Packed):
            self.dense = Coded(w) if codes else Scaled(w)
        else:  # none, or a 16-bit weight: frozen
            self.register_buffer("dense", None if w is None else w.float())
        if self.rank:
            for name in ("u", "v"):
                f = layer.svdq._modules.get(name)
                if factors:
                    setattr(self, name, nn.Parameter(layer.factor(name).clone()))
                elif isinstance(f, runtime.Packed):
                    setattr(self, name, Coded(f) if codes else Scaled(f))
                else:  # 16-bit factors: frozen
                    self.register_buffer(name, layer.factor(name).clone())
            self.register_buffer("s0", layer.svdq.s.detach().float().clone())
            self.log_s = nn.Parameter(torch.zeros_like(self.s0))
        self.index = layer.index  # the output rows a `rows` layer's dense part stores, or None
        shape = (self.out_features, self.in_features)
        self.sparse = SparseTerm(layer.svdq.sparse, shape) if layer.nnz else None
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone())
        self.bias_dtype = None if layer.bias is None else layer.bias.dtype

    def _value(self, part) -> torch.Tensor:
        if isinstance(part, (Scaled, Coded)):
            return part.value()
        if isinstance(part, nn.Parameter) and self.qat:
            return fake_quant(part, self.fbits, self.block)
        return part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.conv is not None:  # as StoredLinear runs a convolution: (B, in, H, W)
            conv = runtime._conv  # noqa: SLF001  (the loaders' own geometry)
            y = None if self.dense is None else conv(x, self._value(self.dense), self.conv)
            if self.rank:
                u, v = self._value(self.u), self._value(self.v)
                z = conv(x, v, self.conv) * (self.s0 * self.log_s.exp())[:, None, None]
                y = conv(z, u.T, None) if y is None else y + conv(z, u.T, None)
            return y if self.bias is None else y + self.bias[:, None, None]
        y = None
        if self.dense is not None:
            y = x @ self._value(self.dense).T
            y = runtime._spread(y, self.index, self.out_features)  # noqa: SLF001
        if self.rank:
            u, v = self._value(self.u), self._value(self.v)
            low = ((x @ v.T) * (self.s0 * self.log_s.exp())) @ u
            y = low if y is None else y + low
        if self.sparse is not None:
            y = y + self.sparse(x)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def settle(self) -> None:
        """Round the trained values to what `stored_tensors` writes, and stop fake-quantizing:
        the module then computes exactly what the fine-tuned artifact loads as."""
        for part in (self.dense, *((self.u, self.v) if self.rank else ())):
            if isinstance(part, (Scaled, Coded)):
                part.settle()
            elif isinstance(part, nn.Parameter):
                part.copy_(stored_factor(part, self.fbits, self.block).dequantize())
        if self.rank:
            self.s0.mul_(self.log_s.exp())
            self.log_s.zero_()
        if self.sparse is not None:
            self.sparse.settle()
        if self.bias is not None:
            self.bias.copy_(self.bias.to(self.bias_dtype).float())
        self.qat = False

    @torch.no_grad()
    def stored_tensors(self, version: int) -> dict[str, torch.Tensor]:
        """The trained tensors under the artifact's keys, as the plan stores them (call
        `settle` first)."""
        key = runtime.keys(self.entry["name"], version)
        out = {}
        if isinstance(self.dense, (Scaled, Coded)):
            out.update(self.dense.tensors(key["weight"]))  # (a 16-bit weight is never Scaled)
        if self.rank:
            for name in ("u", "v"):
                part = getattr(self, name)
                if isinstance(part, (Scaled, Coded)):
                    out.update(part.tensors(key[name]))
                elif isinstance(part, nn.Parameter):
                    out.update(stored_factor(part, self.fbits, self.block).tensors(key[name]))
            out[key["s"]] = (self.s0 * self.log_s.exp()).float().contiguous()
        if self.sparse is not None:
            out[key["sparse"] + ".values"] = self.sparse.values.detach().to(self.sparse.dtype)
        if self.bias is not None:
            out[key["bias"]] = self.bias.detach().to(self.bias_dtype).contiguous()
        return out


def float32(model: nn.Module) -> nn.Module:
    """`model` in float32 in place. Through nn.Module: transformers refuses `.float()` on a model
    it flags as quantized, as it flags GGUF sources it de-quantized on load."""
    return nn.Module.float(model)


def is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def prepare(model: nn.Module, manifest: dict, factors: bool = False,
            codes: bool = False, embedding: bool = False) -> dict[str, nn.Parameter]:
    """Swap every StoredLinear of `model` for a TunedLinear, freeze everything else but norms
    and biases (and with `embedding` the token embedding and output head where they are stored
    in float); returns the trainable parameters by their artifact key (tensors of the tuned
    layers excepted: `stored_tensors` gives those)."""
    plan = {p["name"]: p for p in manifest["layers"]}
    for name, module in list(model.named_modules()):
        if isinstance(module, runtime.StoredEmbedding):
            continue  # a quantized embedding stays as stored, frozen: its codes are its form
        if isinstance(module, runtime.StoredLinear):
            runtime.set_module(model, name, TunedLinear(module, plan[name], factors, codes))
    if hasattr(model, "svdq"):
        del model.svdq  # the codebooks: the tuned layers hold float values
    float32(model)
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
    if embedding:  # float-stored ends only: a StoredEmbedding or a TunedLinear is neither
        ends = {id(m) for m in layers.ends(model) if isinstance(m, (nn.Embedding, nn.Linear))}
        found = [(n, p) for n, p in model.named_parameters()
                 if n.endswith(".weight") and id(model.get_submodule(n[:-7])) in ends]
        if not found:
            raise SvdqError("--train-embedding: this artifact stores no token embedding or "
                            "output head in float (a quantized one stays as stored); drop it")
        for name, p in found:
            p.requires_grad_(True)
            plain[name] = p  # a tied head shares the embedding's tensor and key
    return plain
