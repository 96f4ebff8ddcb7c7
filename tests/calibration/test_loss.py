"""The head's losses (svdq/calibration/loss.py): a causal LM's token loss in chunks, and its
head in bfloat16 where `--fast` asks for it and the device has native bfloat16 products."""
from __future__ import annotations

import pytest
import torch

from svdq.calibration import loss
from svdq.calibration.gradients import gradients
from svdq.models import blocks as model_blocks


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(loss, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert loss.native_bf16("cpu") and loss.native_bf16(torch.device("cpu"))
    monkeypatch.setattr(loss, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not loss.native_bf16("cpu")
    assert not loss.native_bf16("meta")


@pytest.fixture
def llama(models):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(models["llama"]).eval()


def test_token_loss_in_bf16_is_close_to_float32_and_not_the_same(llama, monkeypatch):
    monkeypatch.setattr(loss, "LOGIT_BYTES", 4 * 64 * 5)  # chunks of 5 positions
    torch.manual_seed(0)
    ids = torch.randint(3, 60, (1, 24))
    with torch.no_grad():  # the first block's inputs, given to the head as if the last's
        hidden = model_blocks.capture(llama, ids, 1).hidden[0]
    head = llama.get_output_embeddings()
    with model_blocks.tail(llama) as cell, torch.no_grad():
        exact = loss.token_loss(llama, cell, hidden, ids)
        with loss.bf16_head(llama):
            assert llama.get_output_embeddings().weight.dtype == torch.bfloat16
            low = loss.token_loss(llama, cell, hidden, ids)
        with loss.bf16_head(llama, enabled=False):
            assert llama.get_output_embeddings() is head
    assert llama.get_output_embeddings() is head  # put back
    assert head.weight is llama.get_input_embeddings().weight  # still tied
    with torch.no_grad():
        llama.model.layers, real = torch.nn.ModuleList(), llama.model.layers
        try:  # the blocks skipped: the head applied to the embeddings, as above
            want = llama(ids, labels=ids).loss.item() * 23
        finally:
            llama.model.layers = real
    assert exact == pytest.approx(want, rel=1e-5)
    assert low == pytest.approx(exact, rel=1e-2) and low != exact


def test_gradients_with_the_head_in_bf16_are_close(llama):
    torch.manual_seed(0)
    ids = torch.randint(3, 60, (2, 16))
    modules = {n: m for n, m in llama.named_modules() if n.endswith(("q_proj", "down_proj"))}
    exact = gradients(llama, ids, modules, True, 0, fisher=False)
    low = gradients(llama, ids, modules, True, 0, fisher=False, bf16=True)
    for name in modules:
        assert low[name][1] == pytest.approx(exact[name][1], rel=5e-2)
    assert any(low[n][1] != exact[n][1] for n in modules)


def test_a_head_that_is_not_a_plain_float32_linear_is_left_alone(llama):
    stored = torch.nn.Sequential(llama.get_output_embeddings())  # as a plan's stored head
    llama.set_output_embeddings(stored)
    with loss.bf16_head(llama):
        assert llama.get_output_embeddings() is stored
    llama.set_output_embeddings(stored[0])
    with pytest.raises(RuntimeError), loss.bf16_head(llama):  # put back whatever happens
        assert llama.get_output_embeddings() is not stored[0]
        raise RuntimeError("inside")
    assert llama.get_output_embeddings() is stored[0]


def test_a_model_that_cannot_swap_its_head_keeps_it(llama, monkeypatch):
    head = llama.get_output_embeddings()
    monkeypatch.setattr(type(llama), "set_output_embeddings", lambda self, new: None)
    with loss.bf16_head(llama):
        assert llama.get_output_embeddings() is head
    assert llama.get_output_embeddings() is head


def test_draw_follows_the_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1e9, 0.5]]).repeat(40000, 1)
    counts = torch.bincount(loss.draw(logits, g), minlength=5).double() / 40000
    want = torch.softmax(logits[0].double(), -1)
    assert torch.allclose(counts, want, atol=0.01)  # 4 standard errors at 40,000 draws
    assert counts[3] == 0  # a word of no probability is never drawn
    again = loss.draw(logits[:5], torch.Generator().manual_seed(1))
    assert torch.equal(again, loss.draw(logits[:5], torch.Generator().manual_seed(1)))
