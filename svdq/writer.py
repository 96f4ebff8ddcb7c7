"""Tensors to safetensors files as they come, so a walk never holds the whole artifact.

A file is written whenever `shard_bytes` of tensors are waiting (a larger tensor gets a file
of its own); at the end the files are named as transformers names them — one
`model.safetensors`, or `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from svdq import outdir, runtime
from svdq.errors import SvdqError

INDEX = "model.safetensors.index.json"


class TensorWriter:
    def __init__(self, folder: Path, shard_bytes: int) -> None:
        self.folder, self.shard_bytes = folder, shard_bytes
        self._waiting: dict[str, torch.Tensor] = {}
        self._waiting_bytes = 0
        self._parts: list[tuple[str, list[str]]] = []  # written files and their keys
        self.keys: set[str] = set()
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            if key in self.keys:
                raise SvdqError(f"tensor {key!r} was stored twice; this is a bug in svdq")
            n = t.numel() * t.element_size()
            if self._waiting and self._waiting_bytes + n > self.shard_bytes:
                self._flush()
            self._waiting[key] = t.detach().cpu().contiguous()
            self._waiting_bytes += n
            self.keys.add(key)
            self.total_bytes += n

    def _flush(self) -> None:
        outdir.check_space(self.folder, self._waiting_bytes + (1 << 20))
        name = f".part-{len(self._parts) + 1:05d}.safetensors"
        # one metadata key only: safetensors writes several in random order (runs must match)
        save_file(self._waiting, str(self.folder / name), metadata={"format": "pt"})
        self._parts.append((name, list(self._waiting)))
        self._waiting, self._waiting_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Write what waits, name the files; returns {file name: sha256}."""
        if self._waiting or not self._parts:
            self._flush()
        n = len(self._parts)
        names = [runtime.TENSORS] if n == 1 else \
            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (part, _), name in zip(self._parts, names):
            (self.folder / part).rename(self.folder / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: name for (_, keys), name in zip(self._parts, names) for k in keys}}
            (self.folder / INDEX).write_text(json.dumps(index, indent=1))
        return {name: runtime.sha256(self.folder / name) for name in names}
