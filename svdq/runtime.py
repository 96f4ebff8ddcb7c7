"""Load an svdq artifact with torch, transformers and safetensors alone.

This file is svdq's loader. `svdq compress` copies it, byte for byte, into every artifact as
`svdq_loader.py`, so an artifact loads where svdq is not installed:

    python out/svdq_loader.py out/            # load, print a summary
    >>> import svdq_loader; model = svdq_loader.load("out/")

Layers stay as stored (`StoredLinear`: codes, scales and factors, de-quantized a band of rows
at a time in each forward), so the model takes about the artifact's bytes; `load(...,
dequantize=True)` expands them into float layers instead (faster, as large as the source).

Keep it self-contained: nothing here may import svdq or any package beyond torch,
transformers and safetensors (json, hashlib and the standard library are fine).

Tensors lie in `model.safetensors`, or, split into shards, in `model-0000N-of-0000M.safetensors`
(with `model.safetensors.index.json`; the manifest's `shards` lists them with checksums).
Tensor keys (NAME is a module name such as `model.layers.0.mlp.up_proj`):

    NAME.svdq.s                          Σ, float32, shape (k,)
    NAME.svdq.u / NAME.svdq.v            16-bit factors: Uᵀ (k, out) and Vᵀ (k, in), float16
    NAME.svdq.{u,v}.codes / .absmax      the same factors quantized (8-bit or NF4 codes, and
                                         one float32 absmax per block of the flattened factor)
    NAME.svdq.weight.codes / .absmax     a dense layer stored quantized, weight as (out, in)
    NAME.svdq.weight.codes/.scales/.zeros
                                         the same on the uniform integer grid (plan `grid: int`):
                                         codes of `bits` bits packed in a little-endian bit
                                         stream (element k at bits k·bits …), one float16
                                         scale and one packed integer zero point per group of
                                         `block_size` columns of a row (the last group of a row
                                         is shorter when block_size does not divide `in`);
                                         w = (code − zero) · scale
    NAME.weight                          a 16-bit dense layer's or a kept layer's weight; for
                                         every other layer an empty uint8 marker, so a loader
                                         that does not know svdq fails on its shape instead of
                                         leaving the layer random (before format 5 there was
                                         no marker and a quantized weight was NAME.weight.*)
    a residual layer                     NAME.svdq.weight.* (quantized at the plan's `bits`)
                                         plus NAME.svdq.{u,v,s} at its `factor_bits`: Q x +
                                         U(Σ(Vᵀ x)), or one folded weight when de-quantized
    a convolution                        the same keys, its weight read as (out, in·kh·kw) and
                                         Vᵀ as (k, in·kh·kw); the geometry is the model's own
    NAME.svdq.sparse.values / .cols / .rows
                                         a sparse term (format 7, plan `sparse_nnz` entries):
                                         CSR of the entries kept exactly, values float16,
                                         column indices int16 (int32 above 32768 inputs; read
                                         as unsigned), row pointers int32 (out + 1); added to
                                         what the layer's form computes
    a layer with `rows`                  (format 8, plan `rows`: [start, length] runs) a dense
                                         layer that stores only those output rows: its
                                         NAME.svdq.weight is (Σ length, in) and every other
                                         output is zero before the bias (the attention product:
                                         narrower queries and keys, zero-padded per head)
    NAME.bias                            bias of any target layer, in the model's dtype
    svdq.codebook.8 / svdq.codebook.4    the 256 / 16 code values, stored once
    anything else                        an untouched tensor of the model under its own name
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

FORMAT_VERSION = 9  # 2: the residual kind, 3: the manifest checksum, 4: the integer grid,
# 5: quantized weights under NAME.svdq.weight and an empty NAME.weight marker, 6: `stored_dtype`,
# 7: sparse terms (written only where a layer has one), 8: layers storing some output rows,
# 9: an embedding stored quantized (plan `lookup`; written only then)
READS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
ROWS_FORMAT = 8  # what an artifact with `rows` layers and no quantized embedding is written as
SPARSE_FORMAT = 7  # what an artifact with a sparse term and no `rows` layer is written as
STORED_DTYPE_FORMAT = 6  # what an artifact with `stored_dtype` and no sparse term is written as
PLAIN_FORMAT = 5  # what an artifact without `stored_dtype` is written as: svdq releases that
# read 1–5 load it
MANIFEST = "svdq.json"
TENSORS = "model.safetensors"


def keys(name: str, version: int = FORMAT_VERSION) -> dict[str, str]:
    """The tensor keys of target layer `name` (the scheme in this module's docstring) in
    artifact format `version`; a quantized tensor adds `CODES` and `ABSMAX` to its key.
    `weight` is a quantized weight's, `plain` a float one's (a kept or 16-bit layer) and, from
    format 5, the empty marker of every other layer."""
    weight = f"{name}.svdq.weight" if version >= 5 else f"{name}.weight"
    return {"u": f"{name}.svdq.u", "v": f"{name}.svdq.v", "s": f"{name}.svdq.s",
            "weight": weight, "plain": f"{name}.weight", "bias": f"{name}.bias",
            "sparse": f"{name}.svdq.sparse"}


INT16_COLUMNS = 1 << 15  # a sparse term's column indices are int16 up to this many inputs


def sparse_parts(out_f: int, in_f: int, nnz: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The CSR tensors of a sparse term: {suffix: (shape, dtype)}."""
    cols = torch.int16 if in_f <= INT16_COLUMNS else torch.int32
    return {"values": ((nnz,), torch.float16), "cols": ((nnz,), cols),
            "rows": ((out_f + 1,), torch.int32)}


def sparse_coordinates(cols: torch.Tensor, rows: torch.Tensor, out_f: int) -> torch.Tensor:
    """The (row, column) of each stored value of a CSR sparse term, in stored order: (2, nnz)."""
    counts = (rows[1:] - rows[:-1]).long()
    r = torch.repeat_interleave(torch.arange(out_f, device=rows.device), counts)
    c = cols.long() % (1 << 16) if cols.dtype == torch.int16 else cols.long()  # int16: unsigned
    return torch.stack([r, c])


def sparse_matrix(values: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor,
                  shape: tuple[int, int]) -> torch.Tensor:
    """A sparse term as a torch sparse COO matrix (float32)."""
    return torch.sparse_coo_tensor(sparse_coordinates(cols, rows, shape[0]), values.float(), shape,
                                   check_invariants=True).coalesce()  # indices in range


def sparse_apply(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """x Sᵀ for x (..., in) and a sparse COO S (out, in)."""
    flat = x.reshape(-1, x.shape[-1])
    y = torch.sparse.mm(matrix.to(x.device, torch.float32), flat.float().T).T
    return y.to(x.dtype).reshape(*x.shape[:-1], matrix.shape[0])


def runs_index(runs: list) -> torch.Tensor:
    """The rows of [start, length] runs, in order (int64, on the CPU: not meta, it is no state)."""
    return torch.cat([torch.arange(start, start + n, device="cpu") for start, n in runs])


def row_index(layer: dict) -> torch.Tensor | None:
    """The output rows a `rows` layer stores, in order, or None: it stores them all."""
    return runs_index(layer["rows"]) if layer.get("rows") else None


def stored_rows(layer: dict) -> int:
    """How many output rows the layer's dense weight stores."""
    return sum(n for _, n in layer["rows"]) if layer.get("rows") else layer["out_features"]


def _spread(y: torch.Tensor, index: torch.Tensor | None, out_f: int) -> torch.Tensor:
    """Outputs of the stored rows (..., Σ length) put in place among `out_f` zeros."""
    if index is None:
        return y
    full = y.new_zeros(*y.shape[:-1], out_f)
    full[..., index.to(y.device, non_blocking=True)] = y
    return full


def marked(layer: dict) -> bool:
    """Whether a layer of this plan entry carries the empty `NAME.weight` marker (format 5):
    every layer whose weight is not a plain float tensor (a sparse term comes only with
    those)."""
    return layer["kind"] != "dense" or layer["bits"] not in (None, 16)


def marker() -> torch.Tensor:
    """The marker: empty, a shape no loader that ignores svdq accepts for a layer's weight."""
    return torch.empty(0, dtype=torch.uint8)


TILE = 1 << 20  # weight elements de-quantized at a time (temporaries of a few MB)
CODES, ABSMAX, SCALES, ZEROS = ".codes", ".absmax", ".scales", ".zeros"
INT_BITS = (2, 3, 4, 8)  # widths of the uniform integer grid


def codebook_key(bits: int) -> str:
    return f"svdq.codebook.{bits}"


class ArtifactError(ValueError):
    """The artifact is missing, damaged or of another format version."""


# ----------------------------------------------------------------------------- quantized codes
def dequantize(codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor,
               shape: tuple[int, ...], block_size: int, bits: int) -> torch.Tensor:
    """Blockwise codes -> float32 tensor of `shape` (the layout bitsandbytes writes).

    8-bit: one code per byte. 4-bit: two codes per byte, the first element in the high nibble.
    Each block of `block_size` consecutive elements of the flattened tensor shares one absmax.
    Whole blocks, about `TILE` elements at a time (int64 temporaries of 8 MB).
    """
    n = math.prod(shape)
    flat, book = codes.reshape(-1), codebook.float().to(codes.device)
    scale = absmax.float().reshape(-1).to(codes.device)
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    step = block_size * max(1, TILE // block_size)  # even: a 4-bit chunk starts on a byte
    for i in range(0, n, step):
        m = min(step, n - i)
        part = flat[i:i + m] if bits == 8 else flat[i // 2: -(-(i + m) // 2)]
        if bits == 4:
            part = torch.stack((part >> 4, part & 0x0F), dim=1).reshape(-1)
        values = book[part[:m].long()]
        pad = (-m) % block_size
        if pad:
            values = torch.cat((values, values.new_zeros(pad)))
        blocks = scale[i // block_size: i // block_size + values.numel() // block_size]
        out[i:i + m] = (values.view(-1, block_size) * blocks.view(-1, 1)).reshape(-1)[:m]
    return out.reshape(shape)


def unpack(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The first `n` values of `bits` bits each from a little-endian bit stream of bytes
    (`quant.pack`): `bits` bytes hold eight values, read as one 64-bit word; 2²⁰ values at a
    time (int64 temporaries of 8 MB). 2, 4 and 8 bits, whose values never straddle a byte,
    are read byte-wise in uint8 (`_unpack_bytes`); the result is int64 either way."""
    if 8 % bits == 0:
        return _unpack_bytes(packed, n, bits).long()
    if bits == 3:
        return _unpack3(packed, n).long()
    data = packed.reshape(-1)
    out = torch.empty(n, dtype=torch.long, device=data.device)
    shifts = torch.arange(bits, device=data.device) * 8
    fields = torch.arange(8, device=data.device) * bits
    step = 1 << 20
    for i in range(0, n, step):
        part = data[i // 8 * bits: (i + step) // 8 * bits].long()
        part = torch.nn.functional.pad(part, (0, (-part.numel()) % bits)).view(-1, bits)
        word = (part << shifts).sum(1)
        values = ((word[:, None] >> fields) & ((1 << bits) - 1)).reshape(-1)
        out[i:i + step] = values[:min(step, n - i)]
    return out


def _unpack_bytes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """`unpack` for 2, 4 and 8 bits, as uint8: in the little-endian stream value j of a byte
    holds its bits [j·bits, (j + 1)·bits)."""
    per = 8 // bits
    data = packed.reshape(-1)[: -(-n // per)]
    if per == 1:
        return data[:n]
    mask = (1 << bits) - 1
    parts = [(data >> (j * bits)) & mask if j else data & mask for j in range(per)]
    return torch.stack(parts, dim=1).reshape(-1)[:n]


def _unpack3(packed: torch.Tensor, n: int, bits: int = 3) -> torch.Tensor:
    """`unpack` for 3 bits, as int32: three bytes, one 24-bit little-endian word, hold eight."""
    data = packed.reshape(-1)[: -(-n // 8) * 3].int()
    data = torch.nn.functional.pad(data, (0, (-data.numel()) % 3)).view(-1, 3)
    word = data[:, 0] | (data[:, 1] << 8) | (data[:, 2] << 16)
    fields = torch.arange(0, 24, 3, dtype=torch.int32, device=data.device)
    return ((word[:, None] >> fields) & 7).reshape(-1)[:n]


def dequantize_int(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   shape: tuple[int, int], group: int, bits: int) -> torch.Tensor:
    """Uniform integer codes -> float32 (out, in): (code − zero) · scale per group of `group`
    columns of a row (the key scheme above); a band of rows (a multiple of 8: whole bytes of
    codes and zeros) of about `TILE` elements at a time."""
    out_f, in_f = shape
    groups, whole = -(-in_f // group), in_f // group  # the last group may be partial
    scales = scales.reshape(out_f, groups)
    read = _unpack_bytes if 8 % bits == 0 else _unpack3 if bits == 3 else unpack
    out = torch.empty(out_f, in_f, dtype=torch.float32, device=codes.device)
    band = 8 * max(1, TILE // (8 * in_f))
    for r in range(0, out_f, band):
        rows = min(band, out_f - r)
        w = out[r:r + rows]
        w.copy_(read(codes[r * in_f * bits // 8:], rows * in_f, bits).view(rows, in_f))
        z = read(zeros[r * groups * bits // 8:], rows * groups, bits).float().view(rows, groups)
        s = scales[r:r + rows].float()
        head = w[:, :whole * group].unflatten(1, (whole, group))  # a view: changed in place
        head.sub_(z[:, :whole, None]).mul_(s[:, :whole, None])
        if whole < groups:
            w[:, whole * group:].sub_(z[:, whole:]).mul_(s[:, whole:])
    return out


def int_bytes(out_f: int, in_f: int, bits: int, group: int) -> tuple[int, int, int]:
    """Bytes of the codes, the float16 scales and the zero points of an (out, in) weight."""
    groups = out_f * -(-in_f // group)
    return -(-out_f * in_f * bits // 8), 2 * groups, -(-groups * bits // 8)


# ----------------------------------------------------------------------------- the module
class LowRankLinear(nn.Module):
    """y = ((x Vᵀ) · Σ) Uᵀ + b, a drop-in for a linear layer of shape (out, in).

    `u` holds Uᵀ (rank, out) and `v` holds Vᵀ (rank, in): each row is one singular vector.
    """

    def __init__(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                 bias: torch.Tensor | None = None, sparse: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = v.shape[1], u.shape[1], s.shape[0]
        self.u = nn.Parameter(u, requires_grad=False)
        self.s = nn.Parameter(s, requires_grad=False)
        self.v = nn.Parameter(v, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.sparse = sparse  # a sparse term (COO, out × in) added, or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ((x @ self.v.T) * self.s) @ self.u
        if self.sparse is not None:
            y = y + sparse_apply(x, self.sparse)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


# ----------------------------------------------------------------------------- convolutions
# A Conv2d (groups 1, zero padding) is a target like a linear layer: its weight (out, in, kh,
# kw) is read as the matrix (out, in·kh·kw) whose inputs are the unfolded patches. Stored
# low rank it runs as a rank-k convolution with the layer's kernel, stride, padding and
# dilation (Vᵀ reshaped) and a 1×1 convolution back to `out` channels (U Σ).
def conv_of(module: nn.Module) -> dict | None:
    """The geometry of a Conv2d that svdq factorizes, or None (a linear layer, or a conv
    that stays as it is: grouped, depthwise, or padded other than with zeros)."""
    if not isinstance(module, nn.Conv2d) or module.groups != 1 \
            or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    return {"in_channels": module.in_channels, "kernel": tuple(module.kernel_size),
            "stride": tuple(module.stride), "padding": tuple(module.padding),
            "dilation": tuple(module.dilation)}


def _conv(x: torch.Tensor, w: torch.Tensor, conv: dict | None) -> torch.Tensor:
    """x through the weight rows `w` (n, in·kh·kw) as a convolution with `conv`'s geometry
    (a 1×1 one with conv None): (B, in, H, W) -> (B, n, H', W')."""
    if conv is None:
        return nn.functional.conv2d(x, w[:, :, None, None])
    w = w.reshape(w.shape[0], conv["in_channels"], *conv["kernel"])
    return nn.functional.conv2d(x, w, None, conv["stride"], conv["padding"], conv["dilation"])


class LowRankConv2d(nn.Module):
    """A Conv2d of rank k: a k-channel convolution with the original geometry (Vᵀ) and a 1×1
    convolution (U Σ, with the bias) back to `out` channels."""

    def __init__(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                 bias: torch.Tensor | None, conv: dict):
        super().__init__()
        self.conv, self.rank = dict(conv), s.shape[0]
        self.reduce = nn.Parameter(v.reshape(self.rank, conv["in_channels"], *conv["kernel"]),
                                   requires_grad=False)
        self.expand = nn.Parameter((u.T * s)[:, :, None, None], requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        z = nn.functional.conv2d(x, self.reduce, None, c["stride"], c["padding"], c["dilation"])
        return nn.functional.conv2d(z, self.expand, self.bias)

    def extra_repr(self) -> str:
        return f"kernel={self.conv['kernel']}, stride={self.conv['stride']}, rank={self.rank}"


def _conv2d(w: torch.Tensor, bias: torch.Tensor | None, conv: dict) -> nn.Conv2d:
    out = nn.Conv2d(conv["in_channels"], w.shape[0], conv["kernel"], conv["stride"],
                    conv["padding"], conv["dilation"], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(w.reshape(out.weight.shape), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=False)
    return out


def _check_conv(layer: dict, conv: dict | None) -> None:
    if conv is not None and layer.get("rows"):
        raise ArtifactError(f"the manifest gives the convolution {layer['name']!r} rows: the "
                            "artifact is inconsistent; compress the model again")
    if conv is not None and conv["in_channels"] * math.prod(conv["kernel"]) != layer["in_features"]:
        raise ArtifactError(f"the manifest's entry for {layer['name']!r} does not fit the "
                            "model's convolution there: the artifact is inconsistent; "
                            "compress the model again")


def _codes_at(packed: torch.Tensor, k: torch.Tensor, bits: int, high_first: bool) -> torch.Tensor:
    """The `bits`-bit values (2, 4, 8) at flat positions `k` of a packed code stream, int64:
    value j of a byte in its bits [j·bits, (j + 1)·bits) (svdq's integer stream), or from the
    high end (`high_first`: bitsandbytes' NF4, first element in the high nibble)."""
    if bits == 8:
        return packed[k].long()
    per = 8 // bits
    slot = k % per
    shift = (per - 1 - slot) * bits if high_first else slot * bits
    return (packed[k // per].long() >> shift) & ((1 << bits) - 1)


class Packed(nn.Module):
    """A quantized tensor (rows, cols) kept as stored — codes with absmax per block (`bnb`,
    a codebook shared by the model) or packed integer codes with per-group scales and zeros
    (`int`) — and de-quantized a band of rows at a time."""

    def __init__(self, shape: tuple[int, int], bits: int, block: int, grid: str,
                 books: nn.Module | None):
        super().__init__()
        self.shape, self.bits, self.block, self.grid = tuple(shape), bits, block, grid
        n, meta = math.prod(shape), {"device": "meta"}
        if grid == "int":
            n_codes, n_scales, n_zeros = int_bytes(*shape, bits, block)
            self.register_buffer("codes", torch.empty(n_codes, dtype=torch.uint8, **meta))
            self.register_buffer("scales", torch.empty(shape[0], n_scales // 2 // shape[0],
                                                       dtype=torch.float16, **meta))
            self.register_buffer("zeros", torch.empty(n_zeros, dtype=torch.uint8, **meta))
        else:
            self.register_buffer("codes", torch.empty(n if bits == 8 else (n + 1) // 2,
                                                      dtype=torch.uint8, **meta))
            self.register_buffer("absmax", torch.empty(-(-n // block), dtype=torch.float32, **meta))
        object.__setattr__(self, "books", books)  # shared, not this module's: stored once
        # rows per band: whole bytes of codes and zeros, whole blocks of absmax
        self.band = 8 * block * max(1, TILE // (8 * block * shape[1]))
        # 0: `codes` in svdq's layout; n: in torch's int4 CPU layout, blocks of n rows
        # (`_int4_kernel`); the state dict always gives svdq's
        self.layout = 0
        self._register_state_dict_hook(_svdq_layout)
        self._register_load_state_dict_pre_hook(_layout_reset, with_module=True)

    def svdq_codes(self) -> torch.Tensor:
        """The codes in the artifact's layout, whatever layout this module holds them in."""
        if not self.layout:
            return self.codes
        rows, cols = self.shape
        c = _from_int4pack(self.codes, rows, cols, self.layout)
        return (c[:, 0::2] | (c[:, 1::2] << 4)).reshape(-1)

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0 … r1 − 1 de-quantized, float32; r0 a multiple of `band`."""
        (_, cols), b = self.shape, self.bits
        if self.grid == "int":
            groups = -(-cols // self.block)
            codes = self.codes[r0 * cols * b // 8: -(-r1 * cols * b // 8)]
            zeros = self.zeros[r0 * groups * b // 8: -(-r1 * groups * b // 8)]
            scales = self.scales.view(-1, groups)[r0:r1]
            if self.layout:  # whole blocks of the layout (a partial one only at the end)
                z = _unpack_bytes(zeros, (r1 - r0) * groups, 4).view(-1, groups, 1).float()
                w = _from_int4pack(codes, r1 - r0, cols, self.layout).float()
                return w.view(-1, groups, self.block).sub_(z).mul_(
                    scales.float()[..., None]).view(r1 - r0, cols)
            return dequantize_int(codes, scales, zeros, (r1 - r0, cols), self.block, b)
        lo, hi = r0 * cols, r1 * cols
        codes = self.codes[lo: hi] if b == 8 else self.codes[lo // 2: -(-hi // 2)]
        book = self.books.get_buffer(str(b))
        absmax = self.absmax[lo // self.block: -(-hi // self.block)]
        return dequantize(codes, absmax, book, (r1 - r0, cols), self.block, b)

    def full(self) -> torch.Tensor:
        bnb = self._kernels()
        if bnb is not None:
            return _bnb_dequantize(bnb, self, torch.float32)
        return self.rows(0, self.shape[0])  # the de-quantizers band their temporaries themselves

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (any shape) de-quantized, float32, shape (*index.shape, cols): what an
        embedding looks up. 2, 4 and 8 bits (values never straddle a byte); about `TILE`
        elements at a time."""
        (_, cols), b = self.shape, self.bits
        flat = index.reshape(-1).long()
        out = torch.empty(flat.numel(), cols, dtype=torch.float32, device=self.codes.device)
        col = torch.arange(cols, device=self.codes.device)
        step = max(1, TILE // cols)
        for i in range(0, flat.numel(), step):
            r = flat[i:i + step, None]
            k = r * cols + col
            if self.grid == "int":
                groups = -(-cols // self.block)
                zeros = _codes_at(self.zeros, r * groups + torch.arange(groups, device=r.device),
                                  b, high_first=False)
                scales = self.scales.view(-1, groups)[r[:, 0]].float()
                g = col // self.block
                codes = _int4pack_at(self.codes, r, col, self.shape[0], cols, self.layout) \
                    if self.layout else _codes_at(self.codes, k, b, high_first=False)
                out[i:i + step] = (codes - zeros[:, g]) * scales[:, g]
            else:
                book = self.books.get_buffer(str(b))
                out[i:i + step] = book[_codes_at(self.codes, k, b, high_first=True)] \
                    * self.absmax[k // self.block]
        return out.view(*index.shape, cols)

    def _kernels(self):
        """bitsandbytes (`_bnb`) where its kernels read this tensor as stored (a `bnb` grid, a block
        size they take, the package importable; on a GPU, or on the CPU where every row is
        whole blocks: its CPU 4-bit de-quantizer disagrees otherwise, e.g. at 96 × 160 in
        blocks of 64), else None."""
        device = self.codes.device.type
        if self.grid != "bnb" or self.block not in BNB_BLOCKS or not (
                device == "cuda" or (device == "cpu" and self.shape[1] % self.block == 0)):
            return None
        return _bnb()

    def _int4_kernel(self) -> bool:
        """Whether torch's int4 CPU matmul takes this tensor: 4-bit integer codes on the CPU
        in groups it supports, whole groups per row, a multiple of 16 rows (`_int4_rows`).
        The first time, the codes move into that layout, in place: the same bytes, no second
        copy."""
        on_cpu = self.codes.device.type == "cpu"
        if self.layout:
            return on_cpu
        (rows, cols), n = self.shape, _int4_rows()
        if (self.grid != "int" or self.bits != 4 or not on_cpu or not n
                or self.block not in INT4_GROUPS or cols % self.block or rows % 16):
            return False
        c = _unpack_bytes(self.codes, rows * cols, 4).view(rows, cols)
        self._buffers["codes"] = _to_int4pack(c, n)
        self.layout = n
        return True

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Wᵀ: in bfloat16 on the CPU, up to `INT4_TOKENS` tokens, 4-bit integer codes
        through torch's int4 kernel (`_int4_kernel`; 13× faster than de-quantizing for one
        token; in float32 that kernel is slower than de-quantizing); with bitsandbytes' 4-bit
        matmul (NF4) or its blockwise de-quantizer (8-bit) where `_kernels` allows (exact;
        on one CPU thread 3–5× faster for one token, 1.2× for 512:
        benchmarks/results/dequant_speed.md), else a band of rows de-quantized at a time."""
        bnb = self._kernels()
        if bnb is not None:
            return _bnb_matmul(bnb, self, x)
        if x.dtype == torch.bfloat16 and x.numel() <= INT4_TOKENS * x.shape[-1] \
                and self._int4_kernel():
            return _int4_matmul(self, x)
        n = self.shape[0]
        y = x.new_empty(*x.shape[:-1], n)
        for r in range(0, n, self.band):
            r1 = min(r + self.band, n)
            y[..., r:r1] = x @ self.rows(r, r1).to(x.dtype).T
        return y


BNB_BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes' kernels take
INT4_GROUPS = (32, 64, 128, 256)  # the group sizes torch's int4 CPU kernel takes
# the most tokens a forward sends through it: beyond 64 to 96, de-quantizing a band and
# multiplying in bfloat16 is faster (a 1536 × 576 layer, one thread: 64 tokens 1.37 against
# 1.57 ms, 96 tokens 2.10 against 1.65; benchmarks/dequant_speed.py)
INT4_TOKENS = 64
_INT4: list = []  # rows per block of that kernel's layout once probed; 0 where unusable


def _from_int4pack(packed: torch.Tensor, rows: int, cols: int, n: int) -> torch.Tensor:
    """Codes (rows, cols), uint8, from torch's int4 CPU layout: each block of `n` rows
    stored column by column, byte j of a column holding row j (low nibble) and row j + n/2;
    a last, partial block (a multiple of 16 rows) holds rows 2j and 2j + 1 in byte j."""
    full = rows // n * n
    q = packed[: full * cols // 2].reshape(rows // n, cols, n // 2)
    head = torch.cat((q & 15, q >> 4), 2).transpose(1, 2).reshape(full, cols)
    if full == rows:
        return head
    t = packed[full * cols // 2: rows * cols // 2].reshape(cols, (rows - full) // 2)
    tail = torch.stack((t & 15, t >> 4), 2).reshape(cols, rows - full).T
    return torch.cat((head, tail))


def _int4pack_at(packed: torch.Tensor, r: torch.Tensor, c: torch.Tensor, rows: int, cols: int,
                 n: int) -> torch.Tensor:
    """The codes at rows `r` (a column) and columns `c` (a row) of an (rows, cols) tensor in
    torch's int4 CPU layout (`_from_int4pack`), int64: what a table's lookup reads."""
    full = rows // n * n
    inner, tail = r % n, (rows - full) // 2
    in_block = (r // n) * (cols * n // 2) + c * (n // 2) + inner % (n // 2)
    in_tail = full * cols // 2 + c * max(tail, 1) + (r - full) // 2
    head = r < full
    byte = packed[torch.where(head, in_block, in_tail)].long()
    high = torch.where(head, inner >= n // 2, (r - full) % 2 == 1)
    return torch.where(high, byte >> 4, byte & 15)


def _to_int4pack(codes: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `_from_int4pack`, flat."""
    rows, cols = codes.shape
    full = rows // n * n
    c = codes[:full].reshape(rows // n, n, cols).transpose(1, 2)
    t = codes[full:].T
    return torch.cat(((c[..., : n // 2] | (c[..., n // 2:] << 4)).reshape(-1),
                      (t[:, 0::2] | (t[:, 1::2] << 4)).reshape(-1)))


def _int4_rows() -> int:
    """Rows per block of torch's int4 CPU layout (64 with AVX-512, 32 with AVX2), found
    once by packing a probe with torch's own converter and checking both the layout read back
    and the kernel's product; 0 where this torch lacks the ops or lays codes out otherwise."""
    if not _INT4:
        found = 0
        try:
            gen = torch.Generator().manual_seed(0)
            probe = torch.randint(0, 16, (144, 64), dtype=torch.int32, generator=gen)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 2).reshape(-1)
            for n in (64, 32):  # 144 rows: whole blocks and a partial one of 16
                if torch.equal(_from_int4pack(packed, 144, 64, n).int(), probe):
                    scales = torch.rand(144, 2, generator=gen) / 8 + 0.01
                    zeros = torch.randint(0, 16, (144, 2), generator=gen).float()
                    x = torch.randn(3, 64, generator=gen).bfloat16()
                    w = (probe - zeros.repeat_interleave(32, 1)) * scales.repeat_interleave(32, 1)
                    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                        x, packed.view(144, 32), 32, _scales_and_zeros(scales, zeros))
                    ref = x.float() @ w.T
                    if float((y.float() - ref).abs().max()) <= 0.05 * float(ref.abs().max()):
                        found = n
                    break
        except (AttributeError, RuntimeError, NotImplementedError):
            found = 0
        _INT4.append(found)
    return _INT4[0]


def _scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """What torch's int4 kernel takes per group, (groups, rows, 2) bfloat16: the scale and
    (8 − zero) · scale — it computes (code − 8) · scale + that, = (code − zero) · scale."""
    return torch.stack((scales.T, ((8 - zeros) * scales).T), 2).bfloat16().contiguous()


def _int4_matmul(w: "Packed", x: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    groups = cols // w.block
    zeros = _unpack_bytes(w.zeros, rows * groups, 4).view(rows, groups).float()
    sz = _scales_and_zeros(w.scales.float().view(rows, groups), zeros)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, cols).contiguous(),
                                                   w.codes.view(rows, cols // 2), w.block, sz)
    return y.view(*x.shape[:-1], rows)


def _svdq_layout(module: "Packed", state: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: the codes as the artifact stores them, whatever layout runs."""
    if module.layout:
        state[prefix + "codes"] = module.svdq_codes()


def _layout_reset(module: "Packed", *args, **kwargs) -> None:
    """Codes loaded into the module come in the artifact's layout."""
    module.layout = 0


_BNB: list = []  # bitsandbytes once imported, or None where it cannot be


def _bnb():
    """bitsandbytes, whose layout svdq's `bnb` grid is (NF4 codes two per byte, first element in
    the high nibble; 8-bit codes on the dynamic map; float32 absmax per block): its kernels read
    the stored codes without conversion. Imported on first use; None where it is not installed
    (the standalone loader needs nothing beyond torch, transformers and safetensors)."""
    if not _BNB:
        try:
            import bitsandbytes
            import bitsandbytes.functional  # noqa: F401
            _BNB.append(bitsandbytes)
        except Exception:  # not installed, or broken: the torch path
            _BNB.append(None)
    return _BNB[0]


def _bnb_state(bnb, w: Packed, dtype: torch.dtype):
    return bnb.functional.QuantState(absmax=w.absmax, shape=torch.Size(w.shape),
                                     code=w.books.get_buffer(str(w.bits)), blocksize=w.block,
                                     quant_type="nf4", dtype=dtype)


def _bnb_dequantize(bnb, w: Packed, dtype: torch.dtype) -> torch.Tensor:
    if w.bits == 4:
        return bnb.functional.dequantize_4bit(w.codes, _bnb_state(bnb, w, dtype))
    out = bnb.functional.dequantize_blockwise(w.codes, absmax=w.absmax, blocksize=w.block,
                                              code=w.books.get_buffer("8"))
    return out.reshape(w.shape).to(dtype)


def _bnb_matmul(bnb, w: Packed, x: torch.Tensor) -> torch.Tensor:
    if w.bits == 4:
        return bnb.matmul_4bit(x, w.codes, _bnb_state(bnb, w, x.dtype))
    return x @ _bnb_dequantize(bnb, w, x.dtype).T


class StoredLinear(nn.Module):
    """A target layer as the artifact stores it, in memory at its stored size: the quantized
    weight de-quantized a band of rows at a time in each forward, low-rank factors applied as
    ((x Vᵀ) · Σ) Uᵀ, a residual layer as Q x + U(Σ(Vᵀ x)); its tensors under the artifact's keys
    (`weight` the format-5 marker, `svdq.weight`, `svdq.u`, `svdq.v`, `svdq.s`, `bias`)."""

    svdq_layer = True  # a target layer to svdq.models.layers.blocks_of

    def __init__(self, layer: dict, dtype: torch.dtype, books: nn.Module | None,
                 version: int = FORMAT_VERSION, conv: dict | None = None):
        super().__init__()
        _check_layer(layer)
        _check_conv(layer, conv)
        self.conv = conv  # a convolution's geometry (`conv_of`), or None: a linear layer
        out_f, in_f = self.out_features, self.in_features = layer["out_features"], layer["in_features"]
        kind, bits, block = layer["kind"], layer["bits"], layer["block_size"]
        self.kind, self.rank = kind, layer.get("rank", 0) if kind != "dense" else 0
        meta = {"device": "meta"}
        self.svdq = nn.Module()
        dense = None
        if kind in ("dense", "residual") and bits == 16:
            self.register_buffer("weight", torch.empty(out_f, in_f, dtype=torch.float16, **meta))
            dense = self.weight
        elif kind in ("dense", "residual"):
            dense = Packed((stored_rows(layer), in_f), bits, block, layer.get("grid", "bnb"),
                           books)
            if version >= 5:
                self.svdq.weight = dense
            else:
                self.weight = dense
        if version >= 5 and marked(layer):
            self.register_buffer("weight", torch.empty(0, dtype=torch.uint8, **meta))
        if self.rank:
            fbits = layer.get("factor_bits", bits)
            for name, cols in (("u", out_f), ("v", in_f)):
                if fbits in (4, 8):
                    setattr(self.svdq, name, Packed((self.rank, cols), fbits, block, "bnb", books))
                else:
                    self.svdq.register_buffer(name, torch.empty(self.rank, cols,
                                                                dtype=torch.float16, **meta))
            self.svdq.register_buffer("s", torch.empty(self.rank, dtype=torch.float32, **meta))
        self.index = row_index(layer)  # not state: made from the plan; None: every row stored
        self.nnz = layer.get("sparse_nnz", 0)
        if self.nnz:
            sparse = nn.Module()
            for part, (shape, dt) in sparse_parts(out_f, in_f, self.nnz).items():
                sparse.register_buffer(part, torch.empty(shape, dtype=dt, **meta))
            self.svdq.sparse = sparse
        self.bias = nn.Parameter(torch.empty(out_f, dtype=dtype, **meta), requires_grad=False) \
            if layer["bias"] else None

    def _dense(self) -> Packed | torch.Tensor:
        if "weight" in self.svdq._modules:
            return self.svdq.weight
        if isinstance(self._modules.get("weight"), Packed):
            return self._modules["weight"]
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self._forward_conv(x)
        y = None
        if self.kind != "lowrank":
            w = self._dense()
            if isinstance(w, Packed):
                y = w.matmul(x)
            else:
                y = x @ w.to(x.dtype).T
            y = _spread(y, self.index, self.out_features)
        if self.rank:
            u, v = self.factor("u").to(x.dtype), self.factor("v").to(x.dtype)
            low = ((x @ v.T) * self.svdq.s.to(x.dtype)) @ u
            y = low if y is None else y + low
        if self.nnz:
            y = y + sparse_apply(x, self.sparse())
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def sparse(self) -> torch.Tensor | None:
        """The sparse term as a COO matrix (out, in), or None."""
        if not self.nnz:
            return None
        t = self.svdq.sparse
        return sparse_matrix(t.values, t.cols, t.rows, (self.out_features, self.in_features))

    def _forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The same on images (B, in, H, W): the dense weight's rows a band of output
        channels at a time, the factors as a rank-k and a 1×1 convolution."""
        parts = []
        if self.kind != "lowrank":
            w = self._dense()
            if isinstance(w, Packed):
                parts.append(torch.cat([_conv(x, w.rows(r, min(r + w.band, self.out_features))
                                              .to(x.dtype), self.conv)
                                        for r in range(0, self.out_features, w.band)], 1))
            else:
                parts.append(_conv(x, w.to(x.dtype), self.conv))
        if self.rank:
            u, v = self.factor("u").to(x.dtype), self.factor("v").to(x.dtype)
            z = _conv(x, v, self.conv) * self.svdq.s.to(x.dtype)[:, None, None]
            parts.append(_conv(z, u.T, None))
        y = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        return y if self.bias is None else y + self.bias.to(x.dtype)[:, None, None]

    def dense_weight(self) -> torch.Tensor | None:
        """The dense part (out, in), de-quantized, float32 (rows not stored are zero), or
        None for a low-rank layer."""
        if self.kind == "lowrank":
            return None
        w = self._dense()
        w = w.full() if isinstance(w, Packed) else w.float()
        return _spread(w.T, self.index, self.out_features).T

    def factor(self, name: str) -> torch.Tensor:
        """Uᵀ (rank, out) or Vᵀ (rank, in), float32."""
        f = self.svdq._modules.get(name)
        return f.full() if isinstance(f, Packed) else self.svdq.get_buffer(name).float()

    def dequantized(self, dtype: torch.dtype) -> nn.Module:
        """The layer as `build_layer` makes it: a float linear layer (a residual one folded)
        or a `LowRankLinear`, in `dtype`."""
        bias = None if self.bias is None else self.bias.detach()
        sparse = self.sparse()
        if self.rank:
            u, v, s = self.factor("u"), self.factor("v"), self.svdq.s.float()
            if self.kind == "lowrank":
                return _lowrank(u.to(dtype), s.to(dtype), v.to(dtype), bias, self.conv, sparse)
        w = self.dense_weight()
        if self.kind == "residual":
            w = w + (u.T * s) @ v
        if sparse is not None:
            w = w + sparse.to_dense()
        return _dense_module(w.to(dtype), bias, self.conv)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kind={self.kind}, rank={self.rank}")


class StoredEmbedding(StoredLinear):
    """An embedding stored quantized (plan `lookup`, format 9): the rows the tokens look up are
    de-quantized, the rest stay codes; a scaled embedding's `embed_scale` (Gemma) still
    applies. Heads tied to it (`TiedHead`) multiply by the same codes."""

    def __init__(self, layer: dict, dtype: torch.dtype, books: nn.Module | None,
                 version: int, original: nn.Module):
        super().__init__(layer, dtype, books, version)
        self.padding_idx = getattr(original, "padding_idx", None)
        scale = getattr(original, "embed_scale", None)
        self.embed_scale = scale if isinstance(scale, torch.Tensor) else None  # not state
        # the output dtype, following the model's .to(dtype); not state
        self.register_buffer("like", torch.empty(0, dtype=dtype), persistent=False)
        object.__setattr__(self, "original", original)  # its class, for `dequantized`

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self._dense().lookup(ids).to(self.like.dtype)
        return y if self.embed_scale is None else y * self.embed_scale.to(y.device, y.dtype)

    def dequantized(self, dtype: torch.dtype) -> nn.Module:
        """The model's own embedding module again, its weight de-quantized in `dtype`."""
        module = self.original
        module.weight = nn.Parameter(self.dense_weight().to(dtype), requires_grad=False)
        return module


class TiedHead(nn.Module):
    """A head whose weight is a quantized embedding's (tied): logits = x Wᵀ through the same
    codes, a band of vocabulary rows at a time. Holds no tensors of its own."""

    def __init__(self, embedding: StoredEmbedding):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a child: its tensors are stored once
        self.out_features, self.in_features = embedding.out_features, embedding.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding._dense().matmul(x)

    def tied_to(self, embedding: nn.Module) -> nn.Linear:
        """A linear head sharing the (de-quantized) `embedding`'s weight parameter."""
        head = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        head.weight = embedding.weight
        return head

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied"


def _take(tensors: dict, key: str, used: set, shape: tuple[int, ...] | None = None,
          dtype: torch.dtype | None = None, numel: int | None = None) -> torch.Tensor:
    """Stored tensor `key`, checked against the shape, dtype or size the manifest implies."""
    if key not in tensors:
        raise ArtifactError(f"tensor {key!r} is missing from the tensor files: the artifact is damaged; "
                            "compress the model again")
    t = tensors[key]
    wrong = ((shape is not None and tuple(t.shape) != tuple(shape))
             or (dtype is not None and t.dtype != dtype)
             or (numel is not None and t.numel() != numel))
    if wrong:
        want = shape if shape is not None else f"{numel} elements"
        raise ArtifactError(f"tensor {key!r} is {t.dtype} {tuple(t.shape)} where the manifest "
                            f"implies {dtype or t.dtype} {want}: the artifact is inconsistent; "
                            "compress the model again")
    used.add(key)
    return t


def _factor(tensors: dict, key: str, shape: tuple[int, int], bits: int, block_size: int,
            used: set, grid: str = "bnb") -> torch.Tensor:
    if grid == "int":
        n_codes, n_scales, n_zeros = int_bytes(*shape, bits, block_size)
        codes = _take(tensors, key + CODES, used, dtype=torch.uint8, numel=n_codes)
        scales = _take(tensors, key + SCALES, used, dtype=torch.float16, numel=n_scales // 2)
        zeros = _take(tensors, key + ZEROS, used, dtype=torch.uint8, numel=n_zeros)
        return dequantize_int(codes, scales, zeros, shape, block_size, bits)
    if bits not in (4, 8):
        return _take(tensors, key, used, shape=shape, dtype=torch.float16).float()
    n = math.prod(shape)
    codebook = _take(tensors, codebook_key(bits), used, shape=(1 << bits,), dtype=torch.float32)
    codes = _take(tensors, key + CODES, used, dtype=torch.uint8,
                  numel=n if bits == 8 else (n + 1) // 2)
    absmax = _take(tensors, key + ABSMAX, used, dtype=torch.float32,
                   numel=-(-n // block_size))
    return dequantize(codes, absmax, codebook, shape, block_size, bits)


def _check_layer(layer) -> None:
    """A plan entry's fields have the types and ranges the builder relies on."""
    def whole(key, low=1):
        v = layer.get(key) if isinstance(layer, dict) else None
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ArtifactError(f"the manifest's layer entry {str(layer)[:80]!r} has an invalid "
                                f"{key!r}: the artifact is inconsistent; compress the model again")
    if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
        raise ArtifactError("the manifest has a layer entry without a name: the artifact is "
                            "inconsistent; compress the model again")
    for key in ("out_features", "in_features", "block_size"):
        whole(key)
    kind, bits, grid = layer.get("kind"), layer.get("bits"), layer.get("grid", "bnb")
    widths = INT_BITS if grid == "int" else (None, 4, 8, 16)
    if kind not in ("dense", "lowrank", "residual") or bits not in widths \
            or grid not in ("bnb", "int") or (grid == "int" and kind == "lowrank") \
            or not isinstance(layer.get("bias"), bool):
        raise ArtifactError(f"the manifest's entry for {layer['name']!r} has an unknown kind, "
                            "bits or bias: the artifact is inconsistent; compress the model again")
    nnz = layer.get("sparse_nnz", 0)
    if not isinstance(nnz, int) or isinstance(nnz, bool) or nnz < 0 \
            or nnz > layer["out_features"] * layer["in_features"] or (nnz and not marked(layer)):
        raise ArtifactError(f"the manifest's entry for {layer['name']!r} has an invalid "
                            "sparse_nnz: the artifact is inconsistent; compress the model again")
    rows = layer.get("rows")
    if rows is not None:
        pairs = isinstance(rows, list) and rows and all(
            isinstance(r, list) and len(r) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in r) for r in rows)
        if not pairs or kind != "dense" or bits not in (2, 3, 4, 8) or nnz \
                or any(n < 1 or start < 0 for start, n in rows) \
                or any(a[0] + a[1] > b[0] for a, b in zip(rows, rows[1:])) \
                or rows[-1][0] + rows[-1][1] > layer["out_features"]:
            raise ArtifactError(f"the manifest's entry for {layer['name']!r} has invalid rows: "
                                "the artifact is inconsistent; compress the model again")
    lookup = layer.get("lookup")
    if lookup is not None and (not isinstance(lookup, list) or kind != "dense"
                               or not all(isinstance(h, str) for h in lookup)
                               or bits not in (2, 4, 8) or nnz or rows is not None):
        raise ArtifactError(f"the manifest's entry for {layer['name']!r} has an invalid lookup: "
                            "the artifact is inconsistent; compress the model again")
    if kind != "dense":
        whole("rank")
        if layer.get("factor_bits", bits) not in (4, 8, 16) or (kind == "residual" and bits is None):
            raise ArtifactError(f"the manifest's entry for {layer['name']!r} has invalid bits: "
                                "the artifact is inconsistent; compress the model again")


def _linear(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _lowrank(u, s, v, bias, conv: dict | None, sparse: torch.Tensor | None = None) -> nn.Module:
    if conv is None:
        return LowRankLinear(u, s, v, bias, sparse)
    if sparse is not None:
        raise ArtifactError("a convolution with a sparse term: the artifact is inconsistent; "
                            "compress the model again")
    return LowRankConv2d(u, s, v, bias, conv)


def _dense_module(w: torch.Tensor, bias: torch.Tensor | None, conv: dict | None) -> nn.Module:
    return _linear(w, bias) if conv is None else _conv2d(w, bias, conv)


def build_layer(layer: dict, tensors: dict, dtype: torch.dtype, used: set,
                version: int = FORMAT_VERSION, conv: dict | None = None) -> nn.Module | None:
    """The module that replaces target layer `layer` (a plan entry), de-quantized into the
    model's `dtype` (a low-rank layer as its factors, a residual one folded into one weight),
    or None if it stays as is; `conv`: the geometry of a convolution (`conv_of`)."""
    _check_layer(layer)
    _check_conv(layer, conv)
    name, out_f, in_f = layer["name"], layer["out_features"], layer["in_features"]
    key = keys(name, version)
    bias = _take(tensors, key["bias"], used, shape=(out_f,), dtype=dtype) if layer["bias"] else None
    bits, block, grid = layer["bits"], layer["block_size"], layer.get("grid", "bnb")
    if version >= 5 and marked(layer):
        _take(tensors, key["plain"], used, shape=(0,), dtype=torch.uint8)
    wkey = key["plain"] if bits == 16 else key["weight"]
    nnz = layer.get("sparse_nnz", 0)
    sparse = None
    if nnz:
        parts = {part: _take(tensors, f"{key['sparse']}.{part}", used, shape=shape, dtype=dt)
                 for part, (shape, dt) in sparse_parts(out_f, in_f, nnz).items()}
        sparse = sparse_matrix(parts["values"], parts["cols"], parts["rows"], (out_f, in_f))
    if layer["kind"] in ("lowrank", "residual"):
        k, fbits = layer["rank"], layer.get("factor_bits", bits)
        u = _factor(tensors, key["u"], (k, out_f), fbits, block, used)
        v = _factor(tensors, key["v"], (k, in_f), fbits, block, used)
        s = _take(tensors, key["s"], used, shape=(k,), dtype=torch.float32)
        if layer["kind"] == "lowrank":
            return _lowrank(u.to(dtype), s.to(dtype), v.to(dtype), bias, conv, sparse)
        w = _factor(tensors, wkey, (out_f, in_f), bits, block, used, grid) + (u.T * s) @ v
        return _dense_module(_plus(w, sparse).to(dtype), bias, conv)  # folded in once
    if bits is not None:  # 4, 8 or 16 bits, or the integer grid
        w = _factor(tensors, wkey, (stored_rows(layer), in_f), bits, block, used, grid)
        w = _spread(w.T, row_index(layer), out_f).T
        return _dense_module(_plus(w, sparse).to(dtype), bias, conv)
    used.discard(key["bias"])  # a layer kept in its own form loads with the untouched tensors
    return None


def _plus(w: torch.Tensor, sparse: torch.Tensor | None) -> torch.Tensor:
    return w if sparse is None else w + sparse.to_dense().to(w.device)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ----------------------------------------------------------------------------- reading
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_files(manifest: dict) -> dict:
    """{file name: sha256} of the artifact's tensor files: `shards` where the tensors were
    split (model-0000N-of-0000M.safetensors), else the one model.safetensors."""
    shards = manifest.get("shards")
    if shards is None:
        return {TENSORS: manifest.get("sha256")}
    if not isinstance(shards, dict) or not shards:
        raise ArtifactError("the manifest's `shards` is not a list of files with checksums; "
                            "the artifact is damaged: compress the model again")
    return shards


def manifest_digest(manifest: dict) -> str:
    """The checksum a manifest carries of itself: sha256 of its canonical JSON without it."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_manifest(path: str | Path, verify: bool = True) -> dict:
    """The manifest of artifact folder `path`, after checking format version and checksum."""
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise ArtifactError(f"{folder} is not an svdq artifact (no {MANIFEST}); "
                            "give the folder that `svdq compress -o` wrote")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{folder / MANIFEST} is not valid JSON ({e}); "
                            "the artifact is damaged: compress the model again") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{folder / MANIFEST} is not an svdq manifest; the artifact is "
                            "damaged: compress the model again")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READS:
        raise ArtifactError(f"{folder} has svdq format version {version!r}, this loader reads "
                            f"versions {', '.join(map(str, READS))}; use the svdq release that "
                            "wrote it")
    files = tensor_files(manifest)
    for name, digest in files.items():
        if not isinstance(name, str) or "/" in name or not (folder / name).is_file():
            raise ArtifactError(f"{folder / str(name)} is missing; the artifact is incomplete")
        if verify and sha256(folder / name) != digest:
            raise ArtifactError(f"{folder / name} does not match the checksum in {MANIFEST} "
                                "(truncated or modified); compress the model again")
    if version >= 3 and manifest_digest(manifest) != manifest.get("manifest_sha256"):
        raise ArtifactError(f"{folder / MANIFEST} does not match its own checksum (edited or "
                            "damaged); compress the model again")
    return manifest


def load_tensors(path: str | Path, manifest: dict) -> dict:
    """Every stored tensor of artifact folder `path` (all its shards), by key."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict = {}
    for name in tensor_files(manifest):
        try:
            part = load_file(Path(path) / name)
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"cannot read {Path(path) / name} ({e}); compress the model again") from None
        if tensors.keys() & part.keys():
            raise ArtifactError(f"{name} repeats tensors of another shard; the artifact is "
                                "inconsistent: compress the model again")
        tensors.update(part)
    return tensors


def _stored_owner(key: str, layers: set[str]) -> str | None:
    """The stored layer (a name in `layers`) that tensor `key` belongs to, if any."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in layers:
            return ".".join(parts[:i])
    return None


def svdq_key(key: str) -> bool:
    """A tensor of svdq's stored forms (codes, scales, factors, Σ, codebooks)."""
    return ".svdq." in key or key.startswith("svdq.")


def stored_dtype(manifest: dict, dtype: torch.dtype) -> torch.dtype:
    """The dtype the model's `dtype` tensors outside svdq's stored forms are stored in
    (format 6 `stored_dtype`: bfloat16 for a GGUF source de-quantized to float32), else `dtype`."""
    if "stored_dtype" not in manifest:
        return dtype
    stored = getattr(torch, str(manifest["stored_dtype"]), None)
    if not isinstance(stored, torch.dtype) or not stored.is_floating_point:
        raise ArtifactError(f"the manifest's stored_dtype {manifest['stored_dtype']!r} is no "
                            "float dtype: the artifact is inconsistent; compress the model again")
    return stored


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, refused in one line where it cannot be used here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ArtifactError(f"device {device!r} is not a device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"device {device!r} asked for, but no CUDA GPU is available here "
                            "(or torch was built without CUDA); use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ArtifactError(f"device {device!r} asked for, but there are only "
                            f"{torch.cuda.device_count()} CUDA devices")
    return dev


FLOATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load(path: str | Path, device: str | torch.device = "cpu", verify: bool = True,
         dequantize: bool = False, dtype: str | torch.dtype | None = None) -> nn.Module:
    """Load artifact folder `path` as a ready transformers model in eval mode, its layers
    kept as stored (`StoredLinear`: about the artifact's bytes in memory) or, with
    `dequantize`, expanded into float layers of the model's dtype (faster, as large as the
    uncompressed model). `dtype` (float32, float16, bfloat16) runs the model in another dtype
    than the manifest's: its float tensors outside the stored forms are cast to it as they
    load (codes, scales, factors and Σ stay as stored). The skeleton is built without
    parameters; every stored tensor must be used and every tensor of the model provided, or it
    refuses."""
    import transformers

    device = check_device(device)  # before minutes of loading
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        if name not in FLOATS:
            raise ArtifactError(f"dtype {dtype!r} cannot run a model; use float32, float16 or "
                                "bfloat16")
        dtype = FLOATS[name]
    folder = Path(path)
    manifest = read_manifest(folder, verify)
    tensors = load_tensors(folder, manifest)
    try:
        return _assemble(folder, manifest, tensors, transformers, dequantize,
                         dtype).to(device).eval()
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OSError) as e:
        # a last guard: every field is checked above, but a manifest is data from disk
        raise ArtifactError(f"the artifact at {folder} is inconsistent ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); compress the model "
                            "again") from None


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on `meta` (no memory, no initialization) and their
    buffers (rotary frequencies and the like, computed at construction) where they are."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def codebooks(bits: list[int]) -> nn.Module:
    """The shared codebooks' module (`svdq.codebook.{bits}`), empty on `meta`."""
    books = nn.Module()
    for b in bits:
        books.register_buffer(str(b), torch.empty(1 << b, dtype=torch.float32, device="meta"))
    return books


def books_of(layers: list) -> list[int]:
    """The bitsandbytes codebooks plan `layers` needs (4, 8 bits)."""
    need = set()
    for layer in layers:
        _check_layer(layer)
        if layer["kind"] in ("dense", "residual") and layer.get("grid", "bnb") == "bnb":
            need.add(layer["bits"])
        if layer["kind"] != "dense":
            need.add(layer.get("factor_bits", layer["bits"]))
    return sorted(need & {4, 8})


def swap_in(model: nn.Module, layers: list, dtype: torch.dtype, version: int) -> None:
    """Replace each target layer of plan `layers` that is not kept by an empty `StoredLinear`,
    beside the codebooks they need at `model.svdq.codebook`."""
    books = books_of(layers)
    shared = codebooks(books)
    if books:
        model.svdq = nn.Module()
        model.svdq.codebook = shared
    for layer in layers:
        _check_layer(layer)
        if layer.get("lookup") is not None:
            _swap_embedding(model, layer, dtype, shared, version)
        elif layer["kind"] != "dense" or layer["bits"] is not None:
            try:
                conv = conv_of(model.get_submodule(layer["name"]))
            except AttributeError:
                raise ArtifactError(f"the model has no layer {layer['name']!r}: the artifact "
                                    "is inconsistent; compress the model again") from None
            set_module(model, layer["name"], StoredLinear(layer, dtype, shared, version, conv))


def _swap_embedding(model: nn.Module, layer: dict, dtype: torch.dtype, books: nn.Module,
                    version: int) -> None:
    """An embedding stored quantized and the heads tied to it (plan `lookup`)."""
    try:
        original = model.get_submodule(layer["name"])
        heads = [model.get_submodule(h) for h in layer["lookup"]]
    except AttributeError:
        raise ArtifactError(f"the model has no embedding {layer['name']!r} or no head of "
                            f"{layer['lookup']}: the artifact is inconsistent; compress the model "
                            "again") from None
    if not isinstance(original, nn.Embedding) or any(
            not isinstance(h, nn.Linear) or h.weight.shape != original.weight.shape for h in heads):
        raise ArtifactError(f"{layer['name']!r} is not an embedding with heads of its shape: "
                            "the artifact is inconsistent; compress the model again")
    embedding = StoredEmbedding(layer, dtype, books, version, original)
    set_module(model, layer["name"], embedding)
    for head in layer["lookup"]:
        set_module(model, head, TiedHead(embedding))


def dequantize_layers(model: nn.Module, dtype: torch.dtype) -> None:
    """Every kept layer of `model` expanded in place into float modules of `dtype` (a tied
    head then shares its de-quantized embedding's weight again)."""
    done = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, StoredLinear):
            done[id(module)] = module.dequantized(dtype)
            set_module(model, name, done[id(module)])
    for name, module in list(model.named_modules()):
        if isinstance(module, TiedHead):
            set_module(model, name, module.tied_to(done[id(module.embedding)]))


def _assemble(folder: Path, manifest: dict, tensors: dict, transformers,
              dequantize: bool = False, run_dtype: torch.dtype | None = None) -> nn.Module:
    dtype = getattr(torch, str(manifest.get("dtype")), None)
    model_cls = getattr(transformers, str(manifest.get("architecture")), None)
    if not isinstance(dtype, torch.dtype) or not isinstance(model_cls, type) \
            or not isinstance(manifest.get("layers"), list) \
            or not isinstance(manifest.get("aliases", {}), dict):
        raise ArtifactError(f"the manifest of {folder} names no known dtype, architecture or "
                            "layers: the artifact is inconsistent; compress the model again")
    stored = stored_dtype(manifest, dtype)
    config = transformers.AutoConfig.from_pretrained(folder)
    with parameters_on_meta():
        model = model_cls(config)
    model.to(dtype)  # its buffers, as the model would hold them in its own dtype
    swap_in(model, manifest["layers"], dtype, manifest["format_version"])
    run_dtype = run_dtype or dtype
    layers = {n for n, m in model.named_modules() if isinstance(m, StoredLinear)}
    used: set[str] = set()
    state = {}
    for key, t in model.state_dict(keep_vars=True).items():
        source = manifest.get("aliases", {}).get(key, key)
        owner = _stored_owner(key, layers)
        # the model's own float tensors: everything outside the stored layers and their
        # biases (a stored layer's codes, scales, factors and Σ keep their dtypes)
        plain = t.dtype == dtype and not key.startswith("svdq.") and (
            owner is None or key == f"{owner}.bias")
        state[key] = _take(tensors, str(source), used, shape=tuple(t.shape),
                           dtype=stored if plain else t.dtype).to(run_dtype if plain else t.dtype)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ArtifactError(f"the tensor files hold {len(unused)} tensors the manifest does not explain "
                            f"(first: {unused[0]!r}); the artifact is inconsistent")
    model.load_state_dict(state, strict=True, assign=True)
    for module in model.modules():
        if isinstance(module, StoredEmbedding):  # looked-up rows come out in the run's dtype
            module.like = module.like.to(run_dtype)
    with_param = dict(model.named_parameters(remove_duplicate=False))
    for key, source in manifest.get("aliases", {}).items():  # tied weights: one parameter again
        owner, _, leaf = key.rpartition(".")
        if key in with_param and source in with_param:
            setattr(model.get_submodule(owner), leaf, with_param[source])
    if dequantize:
        dequantize_layers(model, run_dtype)
        if hasattr(model, "svdq"):
            del model.svdq
    return model


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python svdq_loader.py ARTIFACT_FOLDER", file=sys.stderr)
        return 2
    try:
        model = load(argv[0])
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(p.numel() for p in model.parameters())  # tied weights are one parameter: counted once
    lowrank = sum(isinstance(m, StoredLinear) and m.kind == "lowrank" for m in model.modules())
    print(f"loaded {type(model).__name__} from {argv[0]}: {n:,} parameters in memory, "
          f"{lowrank} low-rank layers")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
