"""Text for fine-tuning: training sequences and, held out from them, validation sequences.

From a text (a file or WikiText-2) the validation sequences come from the text's last tokens
(at least a tenth of it) and the training sequences from what precedes them, so no validation
token is ever trained on. From `self` (text sampled from the source model) they are separate
samples.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from svdq.calibration import text as calib_text
from svdq.errors import SvdqError


def _split(ids: list[int], samples: int, val_samples: int, length: int, seed: int,
           what: str) -> tuple[torch.Tensor, torch.Tensor]:
    held = max(val_samples * length, len(ids) // 10)
    cut = len(ids) - held
    n_train = min(samples, cut // length)
    if n_train < 1 or held // length < val_samples:
        need = (val_samples + 1) * length + length
        raise SvdqError(f"{what} has {len(ids):,} tokens, too few for training and "
                        f"{val_samples} held-out sequences of {length} tokens (about {need:,} at "
                        "least); give a longer text or lower --seq-len")
    train = calib_text._chunks(ids[:cut], n_train, length, seed, what)
    val = torch.tensor(ids[cut: cut + val_samples * length]).view(val_samples, length)
    return train, val


def check(calib: str) -> None:
    """Refuse a missing or unreadable text file before any model loads."""
    if calib not in ("auto", "wikitext", "self"):
        calib_text.check_file(Path(calib))


def sequences(teacher: nn.Module, tokenizer, calib: str, samples: int, val_samples: int,
              length: int, seed: int, causal: bool,
              report: Callable[[str, int, int], None] | None = None,
              warn: Callable[[str], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(training ids, validation ids, where they came from)."""
    text, what = None, calib
    if calib not in ("auto", "wikitext", "self"):
        text = calib_text.check_file(Path(calib))
        source = str(Path(calib).resolve())
    elif calib in ("auto", "wikitext"):
        text, what, source = calib_text._wikitext(), "WikiText-2 train", "wikitext"
        if text is None and (calib == "wikitext" or not causal):
            raise SvdqError("WikiText-2 cannot be loaded here (offline, or `datasets` is not "
                            "installed); give training text with --calib FILE")
        if text is None and warn is not None:
            warn("WikiText-2 could not be loaded: training on text sampled from the source model")
    if text is None:
        if not causal:
            raise SvdqError("--calib self needs a causal LM; give training text with --calib FILE")
        ids = calib_text._self_text(teacher, tokenizer, samples + val_samples, length, 8, seed,
                                    report)
        train, val = ids[:samples], ids[samples:]
        return train, val, {"source": "self", "length": length, "train_sequences": samples,
                            "val_sequences": val_samples}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    train, val = _split(ids, samples, val_samples, length, seed, what)
    return train, val, {"source": source, "length": length, "train_sequences": len(train),
                        "val_sequences": len(val), "held_out": "the text's last tokens"}
