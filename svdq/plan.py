"""The per-layer plan: what each target layer became, as data that compress writes into the
manifest and save, load and inspect read back; and a compress run's `Result`.

A `LayerPlan` is frozen and its kind explicit — keep | dense | lowrank | residual (the stored
forms of `algo.stored`). In the manifest (format 3) a kept layer is written as it always was,
kind "dense" with bits null, so every artifact written before still loads; the loaders build
each layer from its entry and the tensor keys of `runtime.keys`, the one key scheme.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from svdq import runtime
from svdq.algo.stored import KINDS, Stored
from svdq.models.layers import fp16_bytes, weight_of

_ORDER = ("name", "module", "out_features", "in_features", "bias", "kind", "rank", "k_break",
          "bits", "block_size", "bytes", "fp16_bytes", "error")


@dataclass(frozen=True)
class LayerPlan:
    """One target layer's plan entry. `bits`: the weight's (dense, residual) or the factors'
    (lowrank); `factor_bits`: a residual layer's correction factors; `notes`: what a run adds
    (sensitivity, errors against the source before and after a refit, ...)."""

    name: str
    module: str
    out_features: int
    in_features: int
    bias: bool
    kind: str
    rank: int
    k_break: int
    bits: int | None
    block_size: int
    bytes: int
    fp16_bytes: int
    error: float
    factor_bits: int | None = None
    grid: str = "bnb"  # the weight's grid (dense, residual): bnb, or int (uniform integer)
    sparse_nnz: int = 0  # entries of a sparse term (--sparse; format 7), 0: none
    rows: list | None = None  # a dense layer storing these output rows only ([start, length] runs; format 8)
    lookup: list | None = None  # an embedding stored quantized, the heads tied to it (format 9)
    notes: dict = field(default_factory=dict, compare=True)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}")

    @classmethod
    def of(cls, name: str, module: nn.Module, stored: Stored, tensors: dict[str, torch.Tensor],
           block_size: int, stored_dtype: torch.dtype | None = None) -> "LayerPlan":
        """The entry of layer `name` (the source `module`) stored as `stored`, whose artifact
        tensors are `tensors` (`tensors_of`); `block_size` is recorded where nothing is
        quantized; `stored_dtype`: the dtype the writer stores the model's own float tensors
        in (a kept weight, a bias), where it is not theirs (`Source.stored_dtype`)."""
        w = weight_of(module)
        return cls(name, type(module).__name__, w.shape[0], w.shape[1], module.bias is not None,
                   stored.kind, stored.rank, stored.k_break, stored.bits,
                   stored.block_size or block_size,
                   stored_bytes(tensors, w.dtype, stored_dtype),
                   fp16_bytes(module), stored.error,
                   stored.u.bits if stored.kind == "residual" else None,
                   "bnb" if stored.weight is None else stored.weight.grid,
                   0 if stored.sparse is None else stored.sparse.nnz, stored.rows)

    def noted(self, **notes) -> "LayerPlan":
        return replace(self, notes={**self.notes, **notes})

    def to_json(self) -> dict:
        """The manifest entry (a kept layer: kind "dense", bits null)."""
        entry = {k: getattr(self, k) for k in _ORDER}
        if self.kind == "keep":
            entry["kind"], entry["bits"] = "dense", None
        if self.kind == "residual":
            entry["factor_bits"] = self.factor_bits
        if self.grid != "bnb":  # absent: the bitsandbytes grids every format version knows
            entry["grid"] = self.grid
        if self.sparse_nnz:  # absent: no sparse term, as before format 7
            entry["sparse_nnz"] = self.sparse_nnz
        if self.rows is not None:  # absent: every row stored, as before format 8
            entry["rows"] = [list(r) for r in self.rows]
        if self.lookup is not None:  # absent: a linear layer, as before format 9
            entry["lookup"] = list(self.lookup)
        return {**entry, **self.notes}

    @classmethod
    def from_json(cls, entry: dict) -> "LayerPlan":
        known = {f.name for f in fields(cls)} - {"notes"}
        values = {k: v for k, v in entry.items() if k in known}
        if values.get("kind") == "dense" and values.get("bits") is None:
            values["kind"] = "keep"
        return cls(**values, notes={k: v for k, v in entry.items() if k not in known})


def stored_bytes(tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 stored_dtype: torch.dtype | None = None) -> int:
    """Bytes of `tensors` in the artifact: those of the model's `dtype` outside svdq's stored
    forms in `stored_dtype` where given (as `TensorWriter.cast` writes them)."""
    total = 0
    for key, t in tensors.items():
        cast = stored_dtype is not None and t.dtype == dtype and not runtime.svdq_key(key)
        total += t.numel() * (stored_dtype.itemsize if cast else t.element_size())
    return total


def tensors_of(name: str, module: nn.Module, stored: Stored) -> dict[str, torch.Tensor]:
    """The artifact tensors of layer `name` stored as `stored`, on the CPU, under the keys of
    `runtime.keys`; a kept layer's are its own weight and bias, as the model holds them."""
    keys = runtime.keys(name)
    out: dict[str, torch.Tensor] = {}
    if stored.kind == "keep":
        out[keys["plain"]] = module.weight.detach()
    if stored.kind in ("lowrank", "residual"):
        out.update(stored.u.tensors(keys["u"]))
        out.update(stored.v.tensors(keys["v"]))
        out[keys["s"]] = stored.s
    if stored.kind in ("dense", "residual"):
        out.update(stored.weight.tensors(keys["plain" if stored.bits == 16 else "weight"]))
    if stored.kind == "lowrank" or (stored.kind != "keep" and stored.bits != 16):
        out[keys["plain"]] = runtime.marker()  # a loader that ignores svdq fails on its shape
    if stored.sparse is not None:
        out.update(stored.sparse.tensors(keys["sparse"]))
    if stored.bias is not None:  # its own (the attention product's queries and keys)
        out[keys["bias"]] = stored.bias.detach().to(module.bias.dtype)
    elif module.bias is not None:
        out[keys["bias"]] = module.bias.detach()
    return {k: v.cpu() for k, v in out.items()}


@dataclass
class Result:
    """The compressed model (modules swapped in place where it is in memory), its plan and the
    stored tensors that did not go to a sink."""

    model: nn.Module
    layers: list[dict]
    tensors: dict[str, torch.Tensor]  # stored tensors by artifact key (those not sent to a sink)
    calibration: dict
    source_params: int  # parameters of the model before compression (tied ones once)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    notes: list[str] = field(default_factory=list)
    budget: dict | None = None  # --ratio/--size: requested, planned and achieved bytes
    released: dict[str, torch.Tensor] = field(default_factory=dict)  # streamed blocks' untouched tensors
    planned: set[str] = field(default_factory=set)  # the target layers: their tensors are written
    device: dict = field(default_factory=dict)  # where the work ran (a GPU: its peak memory)
