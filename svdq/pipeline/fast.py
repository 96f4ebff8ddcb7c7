"""`--fast`: a budget's plan search at a fraction of its cost, the judge kept.

A default budget spends its time in a gradient pass over every calibration sequence, GPTQ and
a whitened SVD per layer for each of up to seven quantized bases, four or five candidate
plans built (their corrections refined in two rounds of the alternation) and each carried
through every block on every calibration sequence for the judge (SmolLM2 at 0.281 × fp16:
gradients 95 s, options 175 s, plans 235 s, judge 26 s of 589 s; RESULTS.md, session 20). The
fast search keeps every stage and cuts each where a cut costs least:

- the gradients (the sensitivities, sums over tokens) over a quarter of the sequences, scaled
  back to all of them;
- the `BASES` quantized bases nearest the budget's bits per weight (a plan mixes neighbours:
  at 4.3 bits int4 in 64 and 128 and NF4 in 256; at 3.3 bits int3 in 64 and 128 and NF4 in
  256), not every base within a factor of two; no low rank alone (no SVD of W) and no NF4 in
  `--block-size` blocks (`measured.bits_choices`), which the integer grid dominates;
- at most three candidates: the best estimate, the most exact plain quantization that fits
  (so the judge never keeps a plan worse than GPTQ alone on its loss) and the floored plan
  (often the estimate's own once low rank alone is gone: then two);
- one round of the alternation, not two;
- the corrections' whitened SVDs in float32 (half the time of float64; every error of a
  built form is still measured in float64);
- the judge on the same quarter of the sequences (whole batches): the candidates' streams
  exist only for it when their layers are built on pass 1's statistics. A `--sequential`
  budget calibrates each candidate on its own stream, so there every sequence is carried and
  only the head's loss is taken on the judged ones.

Statistics (the Grams every form is built on) still take every calibration sequence.
"""
from __future__ import annotations

import math

import torch

SHARE = 4  # the gradients and the judge see 1 / SHARE of the calibration sequences ...
LEAST = 4  # ... but at least this many (or all there are)
BASES = 3  # quantized bases offered per layer
ROUNDS = 1  # rounds of the alternation (the default search makes `residual.ROUNDS`)


def samples(total: int) -> int:
    """Sequences the gradient pass takes of `total`."""
    return min(total, max(LEAST, math.ceil(total / SHARE)))


def judged(total: int, batch: int) -> int:
    """Sequences the judge scores of `total`: `samples`, rounded up to whole batches of
    `batch` (the streams hold batches)."""
    return min(total, math.ceil(samples(total) / batch) * batch)


def factor_dtype(fast: bool) -> torch.dtype:
    """What the bases' errors are decomposed in."""
    return torch.float32 if fast else torch.float64
