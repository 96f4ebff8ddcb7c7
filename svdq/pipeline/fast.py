"""`--fast`: a budget's plan search at a fraction of its cost, the judge kept.

A default budget spends its time in a gradient pass over every calibration sequence, GPTQ and
a whitened SVD per layer for each of up to seven quantized bases, four or five candidate
plans built (their corrections refined in two rounds of the alternation) and each carried
through every block on every calibration sequence for the judge (SmolLM2 at 0.281 × fp16:
gradients 95 s, options 175 s, plans 235 s, judge 26 s of 589 s; RESULTS.md, session 20). The
fast search keeps every stage and cuts each where a cut costs least:

- the gradients (the sensitivities, sums over tokens) over a sixteenth of the sequences (at
  least 2), scaled back to all of them (a quarter in session 26, an eighth in 27; on SmolLM2
  at w4 g64's bytes a sixteenth scored 30.06 against an eighth's 30.05, the gradient pass
  8.5 s from 15.5: RESULTS.md);
- the `BASES` (two) quantized bases nearest the budget's bits per weight (a plan mixes
  neighbours: at 4.3 bits int4 in 64 and NF4 in 256; at 3.3 bits int3 in 64 and 128), not
  every base within a factor of two, and never int4 in groups of 2 × `--block-size`, which
  NF4 in 4× blocks dominates (`options.bases`; three bases, as until session 28, scored
  30.05 against two's 30.06 at w4 g64's bytes and 37.86 against 38.32 at w3 g64's, for 10
  and 22 s more on SmolLM2); no low rank alone (no SVD of W) and no NF4 in `--block-size` blocks
  (`measured.bits_choices`), which the integer grid dominates;
- at most three candidates: the best estimate, the most exact plain quantization that fits
  (so the judge never keeps a plan worse than GPTQ alone on its loss) and the floored plan
  (often the estimate's own once low rank alone is gone: then two);
- no round of the alternation (the default makes two; one scored 30.05 against none's 30.04
  on SmolLM2 at w4 g64's bytes, for 4 s more): the plans are built from pass 1's bases as
  they are;
- 8 bits on the integer grid in groups of 2 × `--block-size` instead of bitsandbytes' 8-bit
  blocks, which it dominates (`measured.dense_forms`);
- the bases' errors' whitened SVDs in float32 (half the time of float64; a base's error is
  then the float32 product's energy, ~1e-6 relative), and the error forms' products too
  (`error.products_in`: output norms, plain forms' errors, corrections' errors from their
  base's; summed in float64, within ~1e-5 of float64's; 7 s of a SmolLM2 profile in float64;
  since session 29);
- the judge scores an eighth of the sequences (at least 4; a quarter until session 28: on
  Gemma-3-270M its 262,144-word head made the judge 38 s of a 177 s run), and the candidates'
  streams carry only those (pass 2 captures them as batches of their own; until session 29
  the whole batches of `--batch-size` they lay in): the streams exist only for the judge when
  their layers are built on pass 1's statistics. A `--sequential` budget calibrates each
  candidate on its own stream, so there every sequence is carried and only the head's loss is
  taken on the judged ones;
- the head of the judge and of the gradient pass in bfloat16 where the device multiplies
  bfloat16 natively (`calibration.loss.native_bf16`, `bf16_head`; Gemma-3-270M's
  262,144-word head 2.1× faster on 2 AVX512-BF16 cores: 1.00 s a sequence against 2.13; the
  candidates share the head's rounding, so their losses move alike: on SmolLM2 both up by
  0.0004–0.0005 and the same artifact, on Gemma the same winner; RESULTS.md, session 29).

Statistics (the Grams every form is built on) still take every calibration sequence.
"""
from __future__ import annotations

import math

import torch

SHARE = 8  # the judge scores 1 / SHARE of the calibration sequences, at least LEAST ...
LEAST = 4
GRADIENT_SHARE = 16  # ... the gradient pass 1 / GRADIENT_SHARE, at least GRADIENT_LEAST
GRADIENT_LEAST = 2  # (each: or all there are)
BASES = 2  # quantized bases offered per layer
ROUNDS = 0  # rounds of the alternation (the default search makes `residual.ROUNDS`)


def samples(total: int, share: int = SHARE, least: int = LEAST) -> int:
    """A `share`-th of `total` sequences, at least `least` (or all there are)."""
    return min(total, max(least, math.ceil(total / share)))


def factor_dtype(fast: bool) -> torch.dtype:
    """What the bases' errors are decomposed in."""
    return torch.float32 if fast else torch.float64
