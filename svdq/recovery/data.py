"""What fine-tuning trains on: training sequences and, held out from them, validation
sequences — or for an image model, training and held-out images.

From a text (a file or WikiText-2) the validation sequences come from the text's last tokens
(at least a tenth of it) and the training sequences from what precedes them, so no validation
token is ever trained on. From `self` (text sampled from the source model) they are separate
samples. From a folder of images a seeded draw holds out at least a tenth of them (and at
least `val_samples`); the training images are drawn from the rest.
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


def check(calib: str, images: bool = False) -> None:
    """Refuse a missing or unreadable text file (for an image model: anything but a folder
    of images) before any model loads."""
    from svdq.calibration.images import check_folder, is_image_folder

    if images and not is_image_folder(calib):
        raise SvdqError(f"an image model fine-tunes on images, and --calib {calib} is not a "
                        "folder; give --calib DIR, a folder of PNG or JPEG images")
    if images:
        check_folder(Path(calib).expanduser(), "training folder")
    elif is_image_folder(calib):
        raise SvdqError(f"--calib {calib} is a folder, and a language model fine-tunes on "
                        "text; give a text file")
    elif calib not in ("auto", "wikitext", "self"):
        calib_text.check_file(Path(calib))


def pictures(processor, folder: str, samples: int, val_samples: int, seed: int, channels: int
             ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(training pixels, held-out pixels, where they came from) from a folder of images."""
    from svdq.calibration import images

    found = images.check_folder(Path(folder).expanduser(), "training folder")
    held = max(val_samples, len(found) // 10)
    if len(found) < held + 1:
        raise SvdqError(f"{folder} holds {len(found)} images, too few for training and "
                        f"{held} held-out ones; give more images or lower --val-samples")
    order = torch.randperm(len(found), generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(order[:held])
    train = sorted(order[held: held + samples])
    return (images.pixels(processor, [found[i] for i in train], channels),
            images.pixels(processor, [found[i] for i in val], channels),
            {"source": str(Path(folder).expanduser().resolve()), "kind": "images",
             "train_images": len(train), "val_images": len(val),
             "held_out": "a seeded draw of the folder's images"})


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
