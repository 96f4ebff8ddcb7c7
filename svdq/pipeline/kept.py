"""A budget's statistics kept from pass 1 for pass 2 (`pipeline.two_pass`).

Without `--sequential` (and `--refit`) a layer's statistics come from the source model's own
stream in both passes, so pass 1 writes each block's Grams to the scratch folder and pass 2
reads them back instead of running the block once more to gather them; a causal LM's pass 2
then carries no main stream at all, only the candidates' (an encoder's judged budget still
carries it: it is the judge's reference). On SmolLM2 that is one forward of 30 blocks and its statistics
saved, for 0.8 GB written and read once. Past `LIMIT` bytes of Grams (a 7B model's come to
tens of GB), or where the disk fills while they are written, nothing is kept and pass 2
gathers them again, as before.

Beside the Grams, each layer's quantized weights and its bases' error factors (cut at the
largest rank an option may take) are kept (`put_bases`): pass 2 builds a plan's layers from
them instead of running GPTQ and an SVD per base again — the same numbers, so the same
artifact.
"""
from __future__ import annotations

from pathlib import Path

import torch

from svdq.algo.factorize import LayerStats
from svdq.artifact.outdir import disk_full
from svdq.config import Settings
from svdq.pipeline.work import LayerWork

LIMIT = 4 * 2 ** 30  # bytes of float64 Grams kept at most
BASES_LIMIT = 4 * 2 ** 30  # bytes of quantized bases and their error's factors kept at most


def keeps(settings: Settings) -> bool:
    """Whether pass 2's statistics are pass 1's (without `--sequential` and `--refit`)."""
    return not (settings.sequential or settings.refit)


class Kept:
    """Each block's statistics as pass 1 gathered them, in files under `folder` (None: keep
    nothing). `get(i)` hands them back once, on `device`; None where nothing is kept."""

    def __init__(self, folder: Path | None, limit: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.folder, self.limit, self.size = folder, LIMIT if limit is None else limit, 0
        self.device = device
        self.on = folder is not None
        self._files: list[Path] = []
        self.bases_on, self.bases_size = self.on, 0

    def put(self, i: int, works: list[LayerWork]) -> None:
        """Keep the statistics of block `i`'s layers (layers fed the same input share them)."""
        if not self.on:
            return
        groups: list[LayerStats] = []
        names: dict[str, int] = {}
        for work in works:
            st = work.stats
            k = next((j for j, g in enumerate(groups) if g.gram is st.gram), len(groups))
            if k == len(groups):
                groups.append(st)
            names[work.name] = k
        self.size += sum(g.gram.numel() * g.gram.element_size() for g in groups)
        if self.size > self.limit:
            self.drop()
            return
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        path = self.folder / f"stats-{i}.pt"
        self._files.append(path)
        try:
            torch.save({"names": names, "groups": [(cpu(g.gram), cpu(g.total), g.tokens,
                                                    cpu(g.abs_total)) for g in groups],
                        "weighted": [g.weighted for g in groups]}, path)
        except OSError as e:  # a full disk: keeping is a speed-up only, pass 2 gathers them
            if not disk_full(e):
                raise
            self.drop()

    def get(self, i: int) -> dict[str, LayerStats] | None:
        """Block `i`'s statistics, one LayerStats per layer (sharing tensors and derived
        results where pass 1's did: one copy on the device per input), and the file removed;
        None where nothing is kept."""
        path = None if not self.on else self.folder / f"stats-{i}.pt"
        if path is None or not path.exists():
            return None
        data = torch.load(path, weights_only=True, map_location=self.device)
        path.unlink()
        caches = [{} for _ in data["groups"]]
        return {name: LayerStats(*data["groups"][k], cache=caches[k],
                                 weighted=data["weighted"][k])
                for name, k in data["names"].items()}

    def put_bases(self, n: int, made: dict) -> None:
        """Keep what layer `n`'s options made that pass 2 would make again
        (`measured.measure_layer(made=)`: its quantized weights, its bases' `Residual`s) —
        by GPTQ and an SVD each, the larger part of building a plan's layer. Past
        `BASES_LIMIT` bytes, or on a full disk, no more bases are kept (the Grams may be)."""
        if not (self.on and self.bases_on) or not made:
            return
        tensors = [t for r in made.get("residuals", {}).values()
                   for t in (r.factors.u, r.factors.s, r.factors.vt)]
        tensors += [t for q in made.get("quantized", {}).values() for t in q.tensors("").values()]
        self.bases_size += sum(t.numel() * t.element_size() for t in tensors)
        if self.bases_size > BASES_LIMIT:
            return self._drop_bases()
        path = self.folder / f"bases-{n}.pt"
        self._files.append(path)
        try:
            torch.save(made, path)
        except OSError as e:
            if not disk_full(e):
                raise
            self._drop_bases()

    def bases(self, n: int) -> dict | None:
        """Layer `n`'s kept bases (`put_bases`), on `device`, the file removed; None where
        none were kept."""
        path = None if not self.on else self.folder / f"bases-{n}.pt"
        if path is None or not path.exists():
            return None
        # our own file, written minutes ago in this run's scratch folder: stored forms are
        # svdq's dataclasses, not plain tensors
        made = torch.load(path, weights_only=False, map_location=self.device)
        path.unlink()
        return made

    def _drop_bases(self) -> None:
        self.bases_on = False
        for path in [p for p in self._files if p.name.startswith("bases-")]:
            path.unlink(missing_ok=True)
            self._files.remove(path)

    def drop(self) -> None:
        """Keep nothing from now on, and remove what was kept."""
        self.on = False
        for path in self._files:
            path.unlink(missing_ok=True)
        self._files.clear()
