"""The distillation losses of `svdq finetune`, and their backward pass.

A causal LM's loss is the KL divergence of the next-token distributions, and its logits are the
big tensors of a step: batch × length × vocabulary floats for teacher and student, their log-
softmaxes and the gradient (Gemma 3's 262k words at 4 × 256 tokens: 1 GB each, a 10 GB peak).
So the logits are made a chunk of positions at a time, as the calibration's losses make them
(`calibration.loss`, in chunks 4× larger here): both models run their blocks once, then their
own heads (final norm, output layer, softcaps; `models.blocks.tail`) on the last block's
outputs for `logits_to_keep` positions; each chunk's KL is backpropagated into the student's
last hidden states before the next chunk is made, and those gradients then go through the
blocks once. Models whose forward takes no `logits_to_keep` get the whole logits at once.

With a weight w > 0 the causal loss adds w × the cross-entropy of the student on the text's
own next tokens (`--ce-weight`): its minimum is the teacher's distribution moved a share
w / (1 + w) towards the token that came, so perplexity, which only scores that token, is
trained as well as the match to the teacher.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from svdq.calibration.loss import keeps_logits
from svdq.models import blocks
from svdq.models.layers import blocks_of

# float32 logits of one model made at once, at most: Gemma 3's 262k words at 4 × 256 tokens
# take 4 chunks. Larger chunks are faster (one Gemma 3 step of the KL's forward and backward,
# 4 × 256 tokens, on 2 cores: 38 s with the whole logits, 33 s in chunks of 64 MB, 25–28 s of
# 256 MB), smaller ones save memory.
LOGIT_BYTES = 256 * 2 ** 20


class _Stop(Exception):
    """Raised after the last block: the head is run chunk by chunk instead."""


def last_hidden(model: nn.Module, kw: dict) -> torch.Tensor:
    """The last block's outputs of `model` on inputs `kw` (under autograd if enabled); the
    final norm and head never run."""
    _, stack = blocks_of(model)
    got = []

    def hook(_module, _args, out):
        got.append(out[0] if isinstance(out, tuple) else out)
        raise _Stop

    handle = stack[-1].register_forward_hook(hook)
    try:
        model(**kw)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0]


def head_logits(model: nn.Module, hidden: torch.Tensor, kw: dict,
                keep: torch.Tensor) -> torch.Tensor:
    """`model`'s logits (float32) at positions `keep` from its last block's outputs `hidden`."""
    with blocks.tail(model) as cell:
        cell["value"] = hidden
        return model(**kw, logits_to_keep=keep).logits.float()


def _next_ce(s: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of log-probabilities `s` (B·K, V) at positions `keep` (K) of `ids`
    (B, T) on the tokens that follow them; the last position has none and adds nothing."""
    batch, length = ids.shape
    has = keep < length - 1
    s = s.view(batch, len(keep), -1)[:, has]
    target = ids[:, keep[has] + 1]
    return -s.gather(-1, target[..., None]).sum()


def causal_kl(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, backward: bool,
              autocast: contextlib.AbstractContextManager, ce_weight: float = 0.0
              ) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) of the next-token distributions of `ids` (B, T),
    plus `ce_weight` × the student's mean cross-entropy on the next tokens, with `backward`
    backpropagated into the student; at most `LOGIT_BYTES` of each model's logits exist at
    once."""
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    vocab = teacher.get_output_embeddings()
    ce_n = ids.shape[0] * max(1, ids.shape[1] - 1)
    if not (keeps_logits(student) and keeps_logits(teacher) and vocab is not None):
        with autocast:
            with torch.no_grad():
                t = teacher(**kw).logits.float().flatten(0, 1).log_softmax(-1)
            s = student(**kw).logits.float().flatten(0, 1).log_softmax(-1)
            loss = nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
            if ce_weight:
                every = torch.arange(ids.shape[1], device=ids.device)
                loss = loss + ce_weight * _next_ce(s, ids, every) / ce_n
        if backward:
            loss.backward()
        return loss.detach() if backward else loss
    with autocast:
        with torch.no_grad():
            t_hidden = last_hidden(teacher, kw)
        s_hidden = last_hidden(student, kw)
    h = s_hidden.detach().requires_grad_(backward)
    (batch, length), n = ids.shape, ids.numel()
    step = max(1, LOGIT_BYTES // (4 * vocab.weight.shape[0] * batch))
    total = torch.zeros((), device=ids.device)
    for start in range(0, length, step):
        keep = torch.arange(start, min(start + step, length), device=ids.device)
        with autocast:
            with torch.no_grad():
                t = head_logits(teacher, t_hidden, kw, keep).flatten(0, 1).log_softmax(-1)
            s = head_logits(student, h, kw, keep).flatten(0, 1).log_softmax(-1)
            part = nn.functional.kl_div(s, t, log_target=True, reduction="sum") / n
            if ce_weight:
                part = part + ce_weight * _next_ce(s, ids, keep) / ce_n
        if backward:
            part.backward()
        total = total + part.detach()
    if backward and h.grad is not None:
        s_hidden.backward(h.grad)
    return total


def distill_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, causal: bool,
                 backward: bool = False, bf16: bool = False, ce_weight: float = 0.0
                 ) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student) of the next-token distributions, for an encoder
    the mean 1 − cosine of the mean-pooled last hidden states, and for images (`ids` float
    pixels) the mean KL(teacher ‖ student) of the class distributions. With `backward` its
    gradient is accumulated into the student (and the loss returned detached); `bf16`: the
    forward passes' matrix products in bfloat16 (autocast; the backward outside it);
    `ce_weight`: a causal LM's cross-entropy term (module docstring)."""
    autocast = torch.autocast(ids.device.type, torch.bfloat16, enabled=bf16)
    if causal and not ids.is_floating_point():
        return causal_kl(student, teacher, ids, backward, autocast, ce_weight)
    with autocast:
        if ids.is_floating_point():
            with torch.no_grad():
                t = teacher(pixel_values=ids).logits.float().log_softmax(-1)
            s = student(pixel_values=ids).logits.float().log_softmax(-1)
            loss = nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
        else:
            kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            with torch.no_grad():
                t = _pooled(teacher(**kw, output_hidden_states=True))
            s = _pooled(student(**kw, output_hidden_states=True))
            loss = (1 - nn.functional.cosine_similarity(s, t, dim=-1)).mean().float()
    if backward:
        loss.backward()
        return loss.detach()
    return loss


def _pooled(out) -> torch.Tensor:
    """Mean-pooled last hidden states in float64: 1 − cos of close embeddings is ~1e-5,
    where float32's rounding would be a percent of it."""
    h = getattr(out, "last_hidden_state", None)
    return (out.hidden_states[-1] if h is None else h).double().mean(1)
