"""Calibration streams: what one block receives, batch by batch, as a walk carries it on.

A stream holds one block's input hidden states, batch by batch: what grows with the
calibration (`--calib-samples × --calib-len × hidden × dtype bytes` per stream). They stay in
memory, or on the CPU while the block runs on a GPU (read back batch by batch, as
llm-compressor's sequential pipeline onloads), or in files under a scratch folder with
`--offload-activations` (safetensors, one file per batch, read back when the batch runs). What
else a block receives (masks, position embeddings: `models.blocks.capture`) is small and kept
by the walk.
"""
from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

_ids = itertools.count()


class Stream:
    """One calibration stream. `home` is where hidden states rest: a device (cpu, or the run's
    device) or, with `folder`, files there."""

    def __init__(self, device: torch.device, home: torch.device | None = None,
                 folder: Path | None = None) -> None:
        self.device = device  # where the blocks run
        self.home = home or device
        self.folder = None if folder is None else folder / f"stream-{next(_ids)}"
        if self.folder is not None:
            self.folder.mkdir(parents=True)
        self._hidden: list[torch.Tensor | Path] = []
        self.nbytes = 0

    def append(self, hidden: torch.Tensor) -> None:
        self.nbytes += hidden.numel() * hidden.element_size()
        if self.folder is not None:
            path = self.folder / f"{len(self._hidden):05d}.safetensors"
            save_file({"h": hidden.detach().contiguous().cpu()}, str(path))
            self._hidden.append(path)
        else:
            self._hidden.append(hidden.detach().to(self.home))

    def __len__(self) -> int:
        return len(self._hidden)

    def __getitem__(self, i: int) -> torch.Tensor:
        h = self._hidden[i]
        if isinstance(h, Path):
            h = load_file(str(h))["h"]
        return h.to(self.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def like(self) -> "Stream":
        """An empty stream that keeps its hidden states where this one does."""
        return Stream(self.device, self.home, None if self.folder is None else self.folder.parent)

    def copy(self) -> "Stream":
        """A copy."""
        out = self.like()
        for h in self:
            out.append(h)
        return out

    def drop(self) -> None:
        """Free the hidden states (and their files)."""
        self._hidden = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class Scratch:
    """A folder for offloaded activations, candidate tensors and kept statistics, removed when
    done: `folder` if given (under the artifact's temporary folder, whose owner removes it on
    a failure after counting what it held for a full disk's message), else a new temporary
    folder."""

    def __init__(self, folder: Path | None = None) -> None:
        self.owned = folder is None
        self.path = Path(tempfile.mkdtemp(prefix="svdq-scratch-")) if folder is None else folder
        self.path.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None or self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
