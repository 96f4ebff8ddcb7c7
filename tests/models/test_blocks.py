"""svdq/models/blocks.py: a model walked block by block computes what it computes whole, and
its head, fed the last block's outputs through `tail`, gives the model's own outputs."""
from __future__ import annotations

import pytest
import torch
import transformers

from svdq.models.blocks import capture, run_block, tail
from svdq.models.layers import blocks_of

from conftest import tiny_config


def gemma3_config(vocab: int):
    """Gemma 3 mixes sliding-window and global attention: its blocks get different masks and
    rotary embeddings, so a walk must give each block what that block receives."""
    return transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=vocab, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=128, architectures=["Gemma3ForCausalLM"])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "gemma3"])
def test_walked_blocks_and_tail_equal_the_whole_forward(arch):
    torch.manual_seed(0)
    config = gemma3_config(50) if arch == "gemma3" else tiny_config(arch, 50)
    model = getattr(transformers, config.architectures[0])(config).eval()
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    want = whole.logits if hasattr(whole, "logits") else whole.last_hidden_state
    _, blocks = blocks_of(model)
    finals = []
    captured = capture(model, ids, batch_size=2)
    for b, h in enumerate(captured.hidden):
        for i, block in enumerate(blocks):
            h = run_block(block, h, captured.kwargs[i][b])
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


def test_each_block_gets_its_own_masks():
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(gemma3_config(50)).eval()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    captured = capture(model, ids, batch_size=2)
    first, second = captured.kwargs[0][0], captured.kwargs[1][0]
    # a sliding-window block and a global one: other masks, other rotary frequencies
    assert not torch.equal(first["position_embeddings"][0], second["position_embeddings"][0])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_capture_stops_before_what_follows_the_blocks(arch):
    """The head's logits (batch × len × vocab) are never made while inputs are captured."""
    torch.manual_seed(0)
    config = tiny_config(arch, 50)
    model = getattr(transformers, config.architectures[0])(config).eval()
    after = model.get_output_embeddings() if arch != "bert" else model.pooler
    calls = []
    after.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    captured = capture(model, ids, batch_size=2)
    assert not calls
    assert len(captured.hidden) == 2 and all(len(k) == 2 for k in captured.kwargs)
    model(input_ids=ids)  # the hook does see an ordinary forward
    assert calls
