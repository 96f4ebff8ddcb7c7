"""svdq/plan.py: a layer's plan entry as data, and its manifest JSON both ways."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from svdq.algo.quant import quantize
from svdq.algo.stored import Stored, keep
from svdq.plan import LayerPlan, tensors_of


@pytest.mark.parametrize("kind", ["keep", "dense", "lowrank", "residual"])
def test_plan_and_tensors_of_each_kind_round_trip_through_json(kind):
    layer = nn.Linear(96, 40)
    w = layer.weight.detach()
    u, v = quantize(torch.randn(3, 40), 8, 64), quantize(torch.randn(3, 96), 8, 64)
    s = torch.ones(3)
    stored = {"keep": keep(7),
              "dense": Stored("dense", 0, 7, 4, 0.1, weight=quantize(w, 4, 256)),
              "lowrank": Stored("lowrank", 3, 7, 8, 0.2, u=u, s=s, v=v),
              "residual": Stored("residual", 3, 7, 4, 0.05, u=u, s=s, v=v,
                                 weight=quantize(w, 4, 64))}[kind]
    tensors = tensors_of("blk.0.fc", layer, stored)
    plan = LayerPlan.of("blk.0.fc", layer, stored, tensors, block_size=64).noted(sensitivity=2.0)
    entry = plan.to_json()
    assert entry["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert entry["fp16_bytes"] == 2 * (40 * 96 + 40) and entry["sensitivity"] == 2.0
    if kind == "keep":  # the manifest's form every loader knows
        assert (entry["kind"], entry["bits"]) == ("dense", None)
        assert set(tensors) == {"blk.0.fc.weight", "blk.0.fc.bias"}
    assert LayerPlan.from_json(entry) == plan
    assert plan.block_size == (256 if kind == "dense" else 64)
    assert ("factor_bits" in entry) == (kind == "residual")
