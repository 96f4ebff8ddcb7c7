"""How a budget's candidate plans are compared: their calibration loss, end to end.

A causal LM's loss is its mean next-token cross-entropy on the calibration sequences; an
encoder's is the relative squared distance of its last hidden states to the source's; an
image classifier's the mean KL of its class distributions to the source's. Both are
computed from the last block's outputs of each plan's own stream through the model's head
(`models.blocks.tail`), so a plan is judged one block at a time like everything else:
`losses` takes the streams a walk carried to the end; `judge_of` walks a model that is whole
in memory (sweep) with a plan's layers swapped in.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from svdq.algo.stored import Stored
from svdq.calibration.loss import bf16_head, class_logits, final_states, kl_sum, token_loss
from svdq.config import Settings
from svdq.models.blocks import capture, run_block, tail
from svdq.models.layers import blocks_of, head_of
from svdq.models.load import Source
from svdq.models.streams import Stream
from svdq.pipeline.forms import realize
from svdq.pipeline.work import LayerWork, swapped


def _rows(stream: Stream, ids: torch.Tensor):
    """(sample ids (1, T) or pixels (1, C, H, W), its hidden states) for every sample of
    `stream` that `ids` has (the first rows of a longer stream: `--fast`'s judge)."""
    row = 0
    for h in stream:
        for k in range(h.shape[0]):
            if row == ids.shape[0]:
                return
            yield ids[row: row + 1].to(h.device), h[k: k + 1]
            row += 1


def losses(model: nn.Module, finals: dict[str, Stream], ids: torch.Tensor, causal: bool,
           reference: Stream | None = None,
           heads: dict[str, dict[str, nn.Module]] | None = None,
           bf16: bool = False) -> dict[str, float]:
    """The calibration loss of each stream in `finals` (the last block's outputs of a plan);
    encoders and image classifiers compare against `reference`, the source's own stream
    through the model's own head; `heads[label]`: the plan's head layers, swapped in for its
    loss (`--include`d layers after the blocks). `bf16`: a causal LM's head in bfloat16
    (`loss.bf16_head`; `--fast`, where that is native)."""
    out = {}
    heads = heads or {}
    with tail(model) as cell, torch.no_grad():
        if not causal and ids.is_floating_point():
            ref = [class_logits(model, cell, h, x) for x, h in _rows(reference, ids)]
        elif not causal:
            ref = [final_states(model, cell, h, seq).float().double()
                   for seq, h in _rows(reference, ids)]
            norm = sum(float(r.pow(2).sum()) for r in ref) or 1.0
        for label, stream in finals.items():
            with swapped(model, heads.get(label, {})):
                rows = _rows(stream, ids)
                if causal:
                    with bf16_head(model, bf16):
                        total = sum(token_loss(model, cell, h, seq) for seq, h in rows)
                    out[label] = total / max(ids.shape[0] * (ids.shape[1] - 1), 1)
                elif ids.is_floating_point():  # images: KL of the class distributions
                    out[label] = sum(kl_sum(r, class_logits(model, cell, h, x)) for (x, h), r
                                     in zip(rows, ref)) / max(ids.shape[0], 1)
                else:
                    err = sum(float((final_states(model, cell, h, seq).float().double() - r)
                                    .pow(2).sum()) for (seq, h), r in zip(rows, ref))
                    out[label] = err / norm
    return out


def judge_of(source: Source, works: list[LayerWork], ids: torch.Tensor,
             settings: Settings) -> Callable[[list[Stored]], float]:
    """The calibration loss of `source.model` (whole in memory) with a plan's layers swapped
    in, each layer as stored (`pipeline.forms.realize`); the source's own stream is the
    encoders' reference, computed once here."""
    model = source.model
    device = next(model.parameters()).device
    _, blocks = blocks_of(model)

    def walk_all() -> Stream:
        stream = Stream(device)
        captured = capture(model, ids, settings.batch_size)
        for b, h in enumerate(captured.hidden):
            for i, block in enumerate(blocks):
                h = run_block(block, h, captured.kwargs[i][b])
            stream.append(h)
        return stream

    reference = None if source.is_causal else walk_all()

    head = set(head_of(model, [w.name for w in works]))

    def judge(stored: list[Stored]) -> float:
        layers = {w.name: realize(w, s, settings)[2] for w, s in zip(works, stored)}
        layers = {n: m for n, m in layers.items() if m is not None}
        with swapped(model, {n: m for n, m in layers.items() if n not in head}):
            final = walk_all()
        return losses(model, {"plan": final}, ids, source.is_causal, reference,
                      {"plan": {n: m for n, m in layers.items() if n in head}})["plan"]
    return judge
