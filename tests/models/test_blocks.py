"""svdq/models/blocks.py: a model walked block by block computes what it computes whole, and
its head, fed the last block's outputs through `tail`, gives the model's own outputs."""
from __future__ import annotations

import pytest
import torch
import transformers

from svdq.models.blocks import block_inputs, run_block, tail
from svdq.models.layers import blocks_of

from conftest import tiny_config


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_walked_blocks_and_tail_equal_the_whole_forward(arch):
    torch.manual_seed(0)
    config = tiny_config(arch, 50)
    model = getattr(transformers, config.architectures[0])(config).eval()
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    want = whole.logits if hasattr(whole, "logits") else whole.last_hidden_state
    _, blocks = blocks_of(model)
    finals = []
    for h, kw in block_inputs(model, blocks[0], ids, batch_size=2):
        for block in blocks:
            h = run_block(block, h, kw)
        finals.append(h)
    with tail(model) as cell, torch.no_grad():
        got = []
        for k, h in enumerate(finals):
            cell["value"] = h
            batch = ids[2 * k: 2 * k + 2]
            out = model(input_ids=batch, attention_mask=torch.ones_like(batch))
            got.append(out.logits if hasattr(out, "logits") else out.last_hidden_state)
    assert torch.allclose(torch.cat(got), want, atol=1e-5)
    assert list(blocks_of(model)[1]) == list(blocks)  # the blocks are back
