"""What a compress will hold at its peak, estimated before the work (svdq/pipeline/memory.py)."""
from __future__ import annotations

from svdq.config import Settings
from svdq.models import load as hf
from svdq.models.layers import blocks_of
from svdq.pipeline.memory import estimate


def test_the_memory_estimate_counts_one_block(models):
    source = hf.load_source(str(models["llama"]), stream=True)
    parts = estimate(source, Settings(calib_samples=4, calib_len=32, batch_size=2))
    block = sum(p.numel() * p.element_size() for p in blocks_of(source.model)[1][0].parameters())
    cfg = source.model.config
    assert block < parts["one block"] < 3 * block + 12 * 4 * cfg.intermediate_size * cfg.hidden_size
    assert parts["calibration activations"] == 2 * 4 * 32 * cfg.hidden_size * 4
    assert parts["attention scores"] == 2 * cfg.num_attention_heads * 32 * 32 * 4
    # at most: q, k, v, o, gate, up take hidden-wide inputs, down the intermediate one
    assert parts["input statistics"] == 8 * (6 * cfg.hidden_size ** 2 + cfg.intermediate_size ** 2)


def test_a_budget_counts_its_candidates_and_the_gradient_pass(models):
    source = hf.load_source(str(models["llama"]), stream=True)
    small = dict(calib_samples=4, calib_len=32, batch_size=2)
    eps, budget = estimate(source, Settings(**small)), estimate(source, Settings(budget_ratio=0.3, **small))
    stream = 4 * 32 * source.model.config.hidden_size * 4
    # pass 2 reads pass 1's statistics: five candidates and one block's output, no main stream
    assert budget["calibration activations"] == (5 + 1) * stream
    gathered = estimate(source, Settings(budget_ratio=0.3, sequential=True, **small))
    assert gathered["calibration activations"] == (2 + 5 + 1) * stream  # the main stream's two
    assert budget["gradient pass"] == (2 + 1) * stream + stream  # each block's inputs, then ∂L/∂h
    assert "gradient pass" not in eps and budget["one block"] > eps["one block"]
    offloaded = estimate(source, Settings(budget_ratio=0.3, offload_activations=True, **small))
    assert offloaded["calibration activations"] == 0 and offloaded["gradient pass"] == stream
