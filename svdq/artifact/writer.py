"""Tensors to safetensors files as they come, so a walk never holds the whole artifact.

Tensors wait in memory until `FLUSH_BYTES` of them are there, then go to a part file on disk.
At the end the parts are joined, without reading their tensors, into files of at most
`shard_bytes` named as transformers names them — one `model.safetensors`, or
`model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`. Joining rewrites the
headers and copies the data sections in order; every part's data is a multiple of 8 bytes
long (a tensor whose size is not waits for others that make it so), so every tensor keeps the
alignment safetensors gave it.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from svdq import runtime
from svdq.artifact import outdir
from svdq.errors import SvdqError

INDEX = "model.safetensors.index.json"
FLUSH_BYTES = 64 * 2 ** 20  # what waits in memory before it is written


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TensorWriter:
    """`cast` = (from, to): every tensor of dtype `from` outside svdq's stored forms (untouched
    weights, biases, kept layers) is written in dtype `to`."""

    def __init__(self, folder: Path, shard_bytes: int, flush_bytes: int | None = None,
                 cast: tuple[torch.dtype, torch.dtype] | None = None) -> None:
        self.folder, self.shard_bytes, self.cast = folder, shard_bytes, cast
        self.flush_bytes = FLUSH_BYTES if flush_bytes is None else flush_bytes
        self._waiting: dict[str, torch.Tensor] = {}
        self._odd: dict[str, torch.Tensor] = {}  # sizes not a multiple of 8, until they add up
        self._waiting_bytes = self._odd_bytes = 0
        self._parts: list[tuple[Path, int]] = []  # written part files and their data bytes
        self._named = 0  # part files named so far
        self.keys: set[str] = set()
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            if key in self.keys:
                raise SvdqError(f"tensor {key!r} was stored twice; this is a bug in svdq")
            t = t.detach().cpu().contiguous()
            if self.cast is not None and t.dtype == self.cast[0] and not runtime.svdq_key(key):
                t = t.to(self.cast[1])
            if t.storage_offset() or t.untyped_storage().nbytes() != _nbytes(t):
                t = t.clone()  # a view: safetensors writes whole storages
            n = _nbytes(t)
            self.keys.add(key)
            self.total_bytes += n
            if n % 8:
                self._odd[key] = t
                self._odd_bytes += n
                if self._odd_bytes % 8:
                    continue
                self._waiting.update(self._odd)
                self._waiting_bytes += self._odd_bytes
                self._odd, self._odd_bytes = {}, 0
            else:
                if self._waiting and self._waiting_bytes + n > self.shard_bytes:
                    self._flush()  # a part exceeds a shard only when one tensor does
                self._waiting[key] = t
                self._waiting_bytes += n
            if self._waiting_bytes >= min(self.flush_bytes, self.shard_bytes):
                self._flush()

    def _flush(self, last: bool = False) -> None:
        group = {**self._waiting, **(self._odd if last else {})}
        size = self._waiting_bytes + (self._odd_bytes if last else 0)
        outdir.check_space(self.folder, size + (1 << 20))
        path = self._part_name()
        # one metadata key only: safetensors writes several in random order (runs must match)
        save_file(group, str(path), metadata={"format": "pt"})
        self._parts.append((path, size))
        self._waiting, self._waiting_bytes = {}, 0
        if last:
            self._odd, self._odd_bytes = {}, 0

    def _part_name(self) -> Path:
        self._named += 1
        return self.folder / f".part-{self._named:05d}.safetensors"

    def adopt(self, other: "TensorWriter") -> None:
        """Take over everything `other` holds (its part files move into this writer's folder;
        nothing is read back): a budget's winning candidate joins the artifact this way."""
        if other.keys & self.keys:
            raise SvdqError(f"tensor {sorted(other.keys & self.keys)[0]!r} was stored twice; "
                            "this is a bug in svdq")
        if other._waiting:
            other._flush()  # a multiple of 8 bytes: the parts stay aligned when joined
        odd = other._odd  # tensors still waiting for others to make their size a multiple of 8
        for path, n in other._parts:
            dest = self._part_name()
            shutil.move(path, dest)
            self._parts.append((dest, n))
        self.keys |= other.keys - set(odd)
        self.total_bytes += other.total_bytes - sum(_nbytes(t) for t in odd.values())
        other._parts, other.keys, other.total_bytes, other._odd, other._odd_bytes = [], set(), 0, {}, 0
        self.add(odd)

    def close(self) -> dict[str, str]:
        """Write what waits, join the parts into shards; returns {file name: sha256}."""
        if self._waiting or self._odd or not self._parts:
            self._flush(last=True)
        shards: list[list[Path]] = [[]]
        size = 0
        for path, n in self._parts:
            if shards[-1] and size + n > self.shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(path)
            size += n
        names = [runtime.TENSORS] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for name, parts in zip(names, shards):
            weight_map.update({k: name for k in _join(parts, self.folder / name)})
        if len(shards) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=1))
        return {name: runtime.sha256(self.folder / name) for name in names}


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def _join(parts: list[Path], dest: Path) -> list[str]:
    """One safetensors file of `parts`, in order (each part removed once copied); its keys."""
    if len(parts) == 1:
        shutil.move(parts[0], dest)
        return [k for k in _header(dest)[0] if k != "__metadata__"]
    header, sources, base = {"__metadata__": {"format": "pt"}}, [], 0
    for part in parts:
        meta, start = _header(part)
        end = base
        for key, info in meta.items():
            if key == "__metadata__":
                continue
            b, e = info["data_offsets"]
            header[key] = {**info, "data_offsets": [base + b, base + e]}
            end = max(end, base + e)
        sources.append((part, start))
        base = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-aligned, as safetensors writes it
    with open(dest, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for part, start in sources:
            with open(part, "rb") as f:
                f.seek(start)
                shutil.copyfileobj(f, out, 1 << 22)
            part.unlink()
    return [k for k in header if k != "__metadata__"]
