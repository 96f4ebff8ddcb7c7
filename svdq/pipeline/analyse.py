"""Every target layer's statistics at once, for a model whole in memory (sweep, tests): a
`Walker` run over all the blocks with nothing compressed."""
from __future__ import annotations

import torch

from svdq.config import Settings
from svdq.errors import SvdqError
from svdq.models.load import Source
from svdq.pipeline import probe
from svdq.pipeline.walk import Walker
from svdq.pipeline.work import Clock, LayerWork, Progress


def analyse(source: Source, settings: Settings, ids: torch.Tensor, report: Progress,
            clock: Clock, gradients: bool = False, fisher: bool = False,
            budget: bool = False) -> list[LayerWork]:
    """Every target layer's work at once, for a model whole in memory (sweep, tests): the
    statistics of all layers are kept. With `gradients` (or method fisher) each carries its
    gradient statistics; `fisher` adds the row Fisher sums. `budget`: the gradients as a
    budget takes them (`probe.gradients`: a causal LM's labels drawn from its own predictions, and
    the token probe, `pipeline.probe`), so sweep's budget rows are `compress --ratio`'s."""
    if source.weights is not None:
        raise SvdqError("analysing every layer at once needs the model whole in memory; load "
                        "it without streaming")
    walker = Walker(source, settings, report, clock)
    fisher = fisher or settings.method == "fisher"
    try:
        if budget:
            probe.gradients(walker, ids, fisher)
        elif gradients or fisher:
            walker.gradients(ids, fisher=fisher)
        walker.start(ids)
        works = []
        for i in range(len(walker.blocks)):
            works += walker.enter(i)
            walker.leave(i)
        works += walker.enter_head()
    finally:
        walker.close()
    return works
