"""The causal distillation loss made a chunk of positions at a time equals the loss of the
whole logits, and so do its gradients, on models with plain, tied and soft-capped heads and
with gradient checkpointing, with and without the cross-entropy term (`--ce-weight`)."""
from __future__ import annotations

import pytest
import torch
import transformers

from svdq.recovery import finetune, losses
from conftest import tiny_config


def pair(arch: str):
    torch.manual_seed(0)
    if arch == "gemma3":  # sliding-window and global blocks, a soft-capped head
        config = transformers.Gemma3TextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=50, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=5.0,
            max_position_embeddings=128, architectures=["Gemma3ForCausalLM"])
    else:
        config = tiny_config(arch, 50)
    make = getattr(transformers, config.architectures[0])
    teacher, student = make(config).eval(), make(config).eval()
    with torch.no_grad():
        for p, q in zip(student.parameters(), teacher.parameters()):
            p.copy_(q + 0.05 * torch.randn_like(q))
    return student, teacher


def grads(student) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("ce", [0.0, 0.7])
@pytest.mark.parametrize("arch,checkpointing", [("llama", False), ("gpt2", False),
                                                ("gemma3", False), ("llama", True)])
def test_chunked_kl_and_its_gradients_equal_the_whole_logits(arch, checkpointing, ce, monkeypatch):
    student, teacher = pair(arch)
    if checkpointing:
        finetune._checkpoint_blocks(student)
    ids = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(losses, "LOGIT_BYTES", 4 * 50 * 3 * 2)  # 2 positions a chunk: 6 chunks
    chunked = losses.distill_loss(student, teacher, ids, True, backward=True, ce_weight=ce)
    got = grads(student)
    monkeypatch.setattr(losses, "keeps_logits", lambda model: False)
    whole = losses.distill_loss(student, teacher, ids, True, backward=True, ce_weight=ce)
    want = grads(student)
    assert float(whole) > 1e-3
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-7)
    assert got.keys() == want.keys() and len(got) > 5
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)
    with torch.no_grad():  # the held-out loss: no graph, the same value
        monkeypatch.undo()
        held = losses.distill_loss(student, teacher, ids, True, ce_weight=ce)
        torch.testing.assert_close(held, whole, rtol=1e-5, atol=1e-7)


def test_the_logits_of_a_step_stay_within_the_chunk_budget(monkeypatch):
    """No head call makes more than a chunk's positions of logits."""
    student, teacher = pair("llama")
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(losses, "LOGIT_BYTES", 4 * 50 * 2 * 4)  # 4 positions a chunk
    sizes = []
    for model in (student, teacher):
        model.get_output_embeddings().register_forward_hook(
            lambda m, a, out: sizes.append(out.shape[1]))
    losses.distill_loss(student, teacher, ids, True, backward=True)
    assert sizes and max(sizes) == 4 and len(sizes) == 2 * 4


@pytest.mark.parametrize("chunked", [True, False])
def test_ce_weight_adds_the_cross_entropy_on_the_next_tokens(chunked, monkeypatch):
    student, teacher = pair("llama")
    ids = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(1))
    if chunked:
        monkeypatch.setattr(losses, "LOGIT_BYTES", 4 * 50 * 3 * 2)  # 2 positions a chunk
    else:
        monkeypatch.setattr(losses, "keeps_logits", lambda model: False)
    with torch.no_grad():
        kl = losses.distill_loss(student, teacher, ids, True)
        mixed = losses.distill_loss(student, teacher, ids, True, ce_weight=0.5)
        logits = student(input_ids=ids).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert float(ce) > 1.0
    torch.testing.assert_close(mixed, kl + 0.5 * ce, rtol=1e-5, atol=1e-6)
    # its gradient is the mixed loss's: a step along it lowers the mixed loss
    losses.distill_loss(student, teacher, ids, True, backward=True, ce_weight=0.5)
    with torch.no_grad():
        for p in student.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
        assert float(losses.distill_loss(student, teacher, ids, True, ce_weight=0.5)) < float(mixed)
