"""What a compress will hold at its peak, by part, estimated before the work starts.

At hidden h, intermediate m, s = --calib-samples × --calib-len tokens: a block's weights in the
source dtype and its largest layer in float32 with its factors while it is searched; the float64
Grams, 8·in² bytes per distinct layer input (q, k and v share one; gate and up another); each
calibration stream s·h·(dtype bytes) — two in eps mode (a block's inputs and outputs), four with
`--sequential --refit`, and in a budget's second pass one more per candidate plan (up to five)
and one block's output — where pass 2 reads pass 1's statistics (`pipeline.kept`: a causal LM
without `--sequential`/`--refit`, Grams under its limit) without the main stream's two —
unless the streams go to files (`walk.offloaded`); attention scores of one batch; what the
tensor writer holds before it writes.
"""
from __future__ import annotations

from svdq.artifact.writer import FLUSH_BYTES
from svdq.config import Settings
from svdq.models.layers import blocks_of, targets, weight_of
from svdq.models.load import Source
from svdq.pipeline.budget import ERROR_CAPS
from svdq.pipeline.compress import CANDIDATE_FLUSH
from svdq.pipeline.kept import LIMIT, keeps
from svdq.pipeline.work import offloaded


def estimate(source: Source, settings: Settings) -> dict[str, int]:
    """A rough peak-memory budget of a compress, by part, in bytes (README: Big models)."""
    model, config = source.model, source.model.config
    prefix, blocks = blocks_of(model)
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    unique = {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()
    block = size(list(blocks[0].parameters()))
    names = [n for n in targets(model, settings.include, settings.exclude)
             if n.startswith(f"{prefix}.0.")]
    shapes = [tuple(weight_of(model.get_submodule(n)).shape) for n in names]  # (out, in)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    stream = settings.calib_samples * settings.calib_len * hidden * next(model.parameters()).element_size()
    largest = max((o * i for o, i in shapes), default=0)
    candidates = len(ERROR_CAPS) + 2 if settings.budgeted else 0
    grams = sum(8 * i * i for _, i in shapes)  # at most: layers fed one input share theirs
    main = 2 + 2 * (settings.sequential and settings.refit)
    if candidates and source.is_causal and keeps(settings) and len(blocks) * grams <= LIMIT:
        main = 0  # pass 2 runs none, and pass 1's two are fewer than its candidates and output
    streams = main + candidates + (candidates > 0)
    parts = {
        "model outside the blocks" if source.weights is not None else "model":
            size(unique) - (len(blocks) * block if source.weights is not None else 0),
        # the block, its largest layer in float32 with its factors (a budget: and the factors
        # of one quantized base's error) while it is searched, each candidate plan's layers
        "one block": block + (5 if settings.budgeted else 3) * 4 * largest + candidates * block,
        "input statistics": grams,
        "calibration activations": 0 if offloaded(settings, hidden, streams) else streams * stream,
        "attention scores": min(settings.batch_size, settings.calib_samples) * heads
        * settings.calib_len ** 2 * 4,
        "artifact not yet written": FLUSH_BYTES + candidates * CANDIDATE_FLUSH,
    }
    if settings.budgeted or settings.method == "fisher":  # every block's inputs, then ∂L/∂h
        boundaries = len(blocks) + 1
        parts["gradient pass"] = (0 if offloaded(settings, hidden, boundaries) else
                                  boundaries * stream) + stream  # and ∂L/∂h of every sample
    return parts
