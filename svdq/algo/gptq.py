"""GPTQ (Frantar et al. 2022): quantize a weight column by column, feeding each column's
rounding error forward into the columns not yet quantized, through the inverse Hessian of
the layer's calibration loss, H = 2 XᵀX (the Gram the walk accumulates; the factor 2 cancels).

As llm-compressor does it (checked: equal layer losses, `benchmarks/gptq/reference.py`): dead
input columns (no energy) are zeroed; H is damped by `damp` × mean(diag H); with `act_order`
the columns go in descending order of diag H (most input energy first) while the groups stay
those of the original column order, so the stored layout needs no permutation index; the
grid's scales are fixed up front from the weight (`quant.int_params`, which with `search` also
shrinks a group's range where the energy-weighted rounding error falls); updates are lazy,
`lazy` columns at a time, through the upper Cholesky factor of H⁻¹ — the same for every grid
a layer is tried on, so it is made once (`prepare`). Every grid svdq stores works: the uniform
integer grid (per-group scale and zero point) and the bitsandbytes ones (NF4 and dynamic
8-bit codes, one absmax per block of the flattened weight).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from svdq.algo.quant import IntQuantized, Quantized, codebook, int_params, int_quantized

DAMP = 0.01  # llm-compressor's and the paper's default dampening fraction
LAZY = 128  # columns per lazy batch update
INNER = 16  # columns per sub-batch: each column updates the rest of its sub-batch only, and a
# sub-batch the rest of its batch in one product (at SmolLM2's shapes within a few percent of
# whole batches: `benchmarks/kernel_speed.py`)


@dataclass(frozen=True)
class Prepared:
    """What GPTQ needs of the Gram, whatever the grid: the dead columns, the column order and
    the upper Cholesky factor of the damped H⁻¹ in that order."""

    dead: torch.Tensor
    perm: torch.Tensor
    hinv: torch.Tensor
    energy: torch.Tensor  # diag H, undamped: the columns' input energies


def prepare(gram: torch.Tensor, damp: float = DAMP, act_order: bool = True,
            dtype: torch.dtype = torch.float32) -> Prepared:
    """In `dtype` (float32, as llm-compressor: half the memory of float64 at 5632 inputs),
    one in × in matrix alive at a time beside the Gram."""
    energy = gram.diagonal().to(torch.float64)
    dead = energy == 0
    energy = torch.where(dead, torch.ones_like(energy), energy)
    damped = energy + damp * float(energy.mean())
    n = energy.shape[0]
    perm = (torch.argsort(damped, descending=True, stable=True) if act_order
            else torch.arange(n, device=gram.device))
    h = torch.empty(n, n, dtype=dtype, device=gram.device)  # permuted a row band at a time:
    for i in range(0, n, 512):  # no float64 copy of the Gram (254 MB at 5632 inputs)
        h[i:i + 512] = gram[perm[i:i + 512]][:, perm].to(dtype)
    h.diagonal().copy_(damped[perm].to(dtype))
    h = torch.linalg.cholesky(h)
    h = torch.cholesky_inverse(h)
    h = torch.linalg.cholesky(h, upper=True)
    return Prepared(dead, perm, h, energy)


class _Grid:
    """Per-column rounding to the grid, with the scales fixed up front from `w`, in `w`'s
    dtype."""

    def __init__(self, w: torch.Tensor, bits: int, block: int, grid: str,
                 energy: torch.Tensor | None, search: bool) -> None:
        self.bits, self.block, self.grid, self.shape = bits, block, grid, tuple(w.shape)
        out_f, in_f = w.shape
        # a column's scales are a row of a (groups, out) table, not of an (in, out) copy:
        # 64× less memory in groups of 64, the same values
        if grid == "int":
            self.scales, self.zeros = int_params(w, bits, block, energy if search else None,
                                                 shrinks=10 if search else 1)
            self.s = self.scales.to(w.device, w.dtype).T.contiguous()  # (groups, out)
            self.z = self.zeros.to(w.device, w.dtype).T.contiguous()
            self.top = float((1 << bits) - 1)
            return
        flat = w.reshape(-1).float()
        pad = (-flat.numel()) % block
        self.absmax = torch.cat((flat, flat.new_zeros(pad))).view(-1, block).abs().amax(1)
        if in_f % block == 0:  # blocks run over the flattened weight: within a row here
            self.a = self.absmax.to(w.dtype).view(out_f, in_f // block).T.contiguous()
        else:  # each entry's absmax, by column
            index = torch.arange(flat.numel(), device=w.device).view(w.shape) // block
            self.a, block = self.absmax.to(w.dtype)[index].T.contiguous(), 1
        self.per = block  # columns per row of `a`
        self.safe = torch.where(self.a > 0, self.a, torch.ones_like(self.a))
        book = codebook(bits).to(w.device, w.dtype)
        self.order = torch.argsort(book)
        self.sorted = book[self.order]
        self.mids = (self.sorted[1:] + self.sorted[:-1]) / 2

    def stored(self, codes: torch.Tensor) -> Quantized | IntQuantized:
        if self.grid == "int":
            return int_quantized(codes, self.scales, self.zeros, self.bits, self.block)
        flat = codes.to(torch.uint8).reshape(-1).cpu()
        if self.bits == 4:
            flat = torch.cat((flat, flat.new_zeros(flat.numel() % 2)))
            flat = (flat[0::2] << 4) | flat[1::2]  # bitsandbytes: the first element high
        return Quantized(flat.contiguous(), self.absmax.float().cpu(), self.shape, self.bits,
                         self.block, codes.device)


class _Part:
    """Grids of one kind side by side in a stacked row: the integer grids (any bits and
    groups), or the bitsandbytes grids of one codebook. Per lazy batch each grid's scales for
    those columns are gathered into one table (columns × the part's rows), so rounding a
    column costs a few operations however many grids share it."""

    def __init__(self, grids: list[_Grid], lo: int, dtype: torch.dtype) -> None:
        self.grids, self.lo = grids, lo
        self.hi = lo + sum(g.shape[0] for g in grids)
        self.int = grids[0].grid == "int"
        if self.int:
            self.top = torch.cat([torch.full((g.shape[0],), g.top, dtype=dtype,
                                             device=g.s.device) for g in grids])
            self.zero = torch.zeros_like(self.top)
        else:
            self.order, self.sorted, self.mids = grids[0].order, grids[0].sorted, grids[0].mids

    def batch(self, cols: torch.Tensor) -> None:
        """The tables for original columns `cols`."""
        if self.int:
            self.s = torch.cat([g.s[cols // g.block] for g in self.grids], 1)
            self.z = torch.cat([g.z[cols // g.block] for g in self.grids], 1)
        else:
            self.a = torch.cat([g.a[cols // g.per] for g in self.grids], 1)
            self.safe = torch.cat([g.safe[cols // g.per] for g in self.grids], 1)

    def round(self, row: torch.Tensor, t: int, codes: torch.Tensor, values: torch.Tensor) -> None:
        """This part of a stacked column, the `t`-th of the batch, rounded: its codes and
        their values written into `codes` and `values` (no temporaries: the loop's cost is
        mostly per operation)."""
        col = row[self.lo:self.hi]
        if self.int:
            s, z = self.s[t], self.z[t]
            torch.div(col, s, out=codes).round_().add_(z)
            torch.clamp(codes, self.zero, self.top, out=codes)
            torch.mul(torch.sub(codes, z, out=values), s, out=values)
            return
        k = torch.bucketize(col / self.safe[t], self.mids)
        codes.copy_(self.order[k])
        torch.mul(self.sorted[k], self.a[t], out=values)


def gptq(w: torch.Tensor, gram: torch.Tensor, bits: int, block_size: int, grid: str = "int",
         act_order: bool = True, damp: float = DAMP, lazy: int = LAZY, search: bool = True,
         dtype: torch.dtype = torch.float32,
         prepared: Prepared | None = None) -> Quantized | IntQuantized:
    """`w` (out, in) quantized by GPTQ against the input Gram `gram` (in, in) on `grid` at
    `bits` (groups or blocks of `block_size`). `search`: let the integer grid's scales shrink
    where that lowers the energy-weighted rounding error (False: plain min-max, as
    llm-compressor's default observer). `dtype`: of the column loop (float64 in tests).
    `prepared`: `prepare(gram, damp, act_order)`, when the caller has it already."""
    return gptq_many(w, gram, [(bits, block_size, grid, search)], act_order, damp, lazy, dtype,
                     prepared)[0]


def gptq_many(w: torch.Tensor | list[torch.Tensor], gram: torch.Tensor,
              grids: list[tuple[int, int, str, bool]],
              act_order: bool = True, damp: float = DAMP, lazy: int = LAZY,
              dtype: torch.dtype = torch.float32,
              prepared: Prepared | None = None) -> list[Quantized | IntQuantized]:
    """`gptq` on several grids at once, each (bits, block size, grid, search): the same
    quantizations as one at a time, in one column loop over copies of `w` side by side — the
    inverse Hessian is the same for every grid, and much of the loop's cost is per column,
    not per row (a budget quantizes each layer on up to eight grids). `w`: one weight for
    every grid, or a list of weights of one input width, one per grid (a layer's refined
    bases; the layers fed the same inputs, q, k and v: each row's codes depend only on the
    row and the inverse Hessian)."""
    ws = list(w) if isinstance(w, (list, tuple)) else [w] * len(grids)
    w = ws[0]
    prep = prepared or prepare(gram.to(w.device), damp, act_order,
                               torch.float64 if dtype == torch.float64 else torch.float32)
    rounders = [_Grid(x.to(dtype), b, k, g, prep.energy, s) for x, (b, k, g, s) in zip(ws, grids)]
    order = sorted(range(len(grids)), key=lambda i: (grids[i][2], grids[i][0]))  # parts together
    parts, lo = [], 0
    for key in dict.fromkeys((grids[i][2], grids[i][2] == "int" or grids[i][0]) for i in order):
        mine = [rounders[i] for i in order if (grids[i][2], grids[i][2] == "int" or grids[i][0])
                == key]
        parts.append(_Part(mine, lo, dtype))
        lo = parts[-1].hi
    perm, hinv = prep.perm, prep.hinv.to(dtype)  # float64 tests: prepare(..., dtype=float64)
    # transposed, (in, out): each column a contiguous row, so the per-column steps read and
    # write contiguous memory (2.3× faster at 5632 × 2048, the same codes)
    wt = torch.cat([ws[i].to(dtype).T[perm] for i in order], 1)  # the copies in `order`
    wt[prep.dead[perm]] = 0
    n = wt.shape[0]
    codes = torch.zeros(wt.shape, dtype=dtype, device=w.device)
    values = torch.empty(wt.shape[1], dtype=dtype, device=w.device)
    # the update of a column's followers is written here, not into a new tensor per column
    # (up to 6 MB each at SmolLM2's widths: a fresh mapping per column under a low mmap threshold)
    work = torch.empty(min(lazy, INNER, n), wt.shape[1], dtype=dtype, device=w.device)
    for i1 in range(0, n, lazy):
        i2 = min(i1 + lazy, n)
        for part in parts:
            part.batch(perm[i1:i2])
        block, errs = wt[i1:i2].clone(), torch.zeros_like(wt[i1:i2])
        hb = hinv[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, INNER):  # the batch in sub-batches: a column's own update
            j2 = min(j1 + INNER, i2 - i1)  # reaches the end of its sub-batch, a product the rest
            for i in range(j1, j2):
                for part in parts:
                    part.round(block[i], i, codes[i1 + i, part.lo:part.hi],
                               values[part.lo:part.hi])
                err = errs[i]
                torch.div(torch.sub(block[i], values, out=err), hb[i, i], out=err)
                torch.mul(hb[i, i:j2, None], err[None, :], out=work[: j2 - i])
                block[i:j2].sub_(work[: j2 - i])
            if j2 < i2 - i1:
                block[j2:].sub_(hb[j1:j2, j2:].T @ errs[j1:j2])
        wt[i2:] -= hinv[i1:i2, i2:].T @ errs
    codes = codes[torch.argsort(perm)]  # back in column order
    done, at = {}, 0
    for i in order:
        out = ws[i].shape[0]
        done[i] = rounders[i].stored(codes[:, at:at + out].T)
        at += out
    return [done[i] for i in range(len(grids))]
