"""What the walk hands out and the helpers around it: a layer's unit of work (`LayerWork`),
the stage clock, when calibration streams go to files, swapping layers into a model for a
forward, and freeing what a group of layers fed the same input shares."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from svdq.algo.factorize import Factors, LayerStats, factorize
from svdq.config import Settings
from svdq.models.layers import set_module, weight_of
from svdq.models.stream import give_back

Progress = Callable[[str, int, int], None]  # (stage, done, total)
# Streams larger than this together go to files under the scratch folder by themselves
# (--offload-activations sends them there at any size).
OFFLOAD_BYTES = 256 * 2 ** 20


def offloaded(settings: Settings, hidden: int, streams: int) -> bool:
    """Whether `streams` calibration streams of width `hidden` go to files: asked for
    (--offload-activations), or larger than OFFLOAD_BYTES together (in float32)."""
    size = streams * settings.calib_samples * settings.calib_len * hidden * 4
    return settings.offload_activations or size > OFFLOAD_BYTES


class Clock:
    """Seconds spent per stage: `lap(stage)` charges the time since the previous lap."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.spent[stage] += now - self._t
        self._t = now


@dataclass
class LayerWork:
    """What choosing a layer's form needs: its weight, statistics and (on first use) factors."""

    name: str
    module: nn.Module  # the original layer
    weight: torch.Tensor | None  # (out, in) float32; None: read from the module on first use
    bias: torch.Tensor | None
    stats: LayerStats
    method: str = "svd"
    given: Factors | None = None  # the factors, once made (or given, as sweep does)

    @property
    def w(self) -> torch.Tensor:
        if self.weight is None:
            self.weight = weight_of(self.module).float()
        return self.weight

    @property
    def factors(self) -> Factors:
        if self.given is None:
            self.given = factorize(self.method, self.w, self.stats)
        return self.given


@contextlib.contextmanager
def swapped(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """`model` with the named layers swapped in; the originals are put back afterwards,
    whatever happens."""
    originals = {name: model.get_submodule(name) for name in layers}
    try:
        for name, module in layers.items():
            set_module(model, name, module)
        yield model
    finally:
        for name, module in originals.items():
            set_module(model, name, module)


def one_input_at_a_time(works: list[LayerWork]) -> Iterator[LayerWork]:
    """The works in order; what their statistics derive (the Gram's root, GPTQ's inverse
    Hessian: hundreds of MB each at 5632 inputs) is freed once the last layer fed that input
    (q, k and v share one; gate and up another) is done."""
    group = []
    for i, work in enumerate(works):
        yield work
        group.append(work)
        work.given = work.weight = None  # its factors and float32 weight
        following = works[i + 1].stats.cache if i + 1 < len(works) else None
        if following is not work.stats.cache:  # the group is done: its Gram goes too
            work.stats.cache.clear()
            for done in group:
                done.stats = None
            group = []
        give_back()
