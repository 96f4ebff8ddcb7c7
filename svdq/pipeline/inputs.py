"""What a compress runs its model on: the calibration token ids of `--calib` (a text file,
WikiText-2, or text sampled from the model) or an image model's pixel values (`--calib DIR`),
and their description for the manifest."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from svdq.calibration import images
from svdq.calibration import text as calibration_text
from svdq.config import Settings
from svdq.errors import SvdqError
from svdq.models import stream
from svdq.models.layers import blocks_of
from svdq.models.load import Source

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def calibration_ids(source: Source, settings: Settings, report: Progress,
                    calibration: dict, warn: Callable[[str], None] | None = None) -> torch.Tensor:
    """The calibration token ids (samples, length) of `settings`; `calibration` gets their
    description for the manifest."""
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SvdqError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    streamed = source.weights is not None
    model = stream.to_device(source.model, device) if streamed else source.model.to(device)

    def whole() -> nn.Module:  # sampling text from the model needs all of it at once
        if streamed:
            if warn is not None:
                warn("sampling calibration text from the model reads all of it into memory "
                     "once; give --calib FILE to keep memory to one block")
            stream.materialize(model, "", source.weights, source.stream_dtype, device)
        return model

    if source.is_vision or images.is_image_folder(settings.calib):
        report("calibration images", 0, 1)
        ids, info = calibration_images(source, settings, warn)
        calibration.update(info)
        report("calibration images", 1, 1)
        return ids
    report("calibration text", 0, 1)
    ids, info = calibration_text.calibration_ids(
        whole, source.tokenizer, settings.calib, settings.calib_samples, settings.calib_len,
        settings.batch_size, settings.seed, source.is_causal, report, warn)
    if streamed:
        blocks_of(model)[1].to("meta")  # back to one block at a time
    calibration.update(info)
    report("calibration text", 1, 1)
    return ids


def calibration_images(source: Source, settings: Settings,
                       warn: Callable[[str], None] | None = None) -> tuple[torch.Tensor, dict]:
    """An image model's calibration pixels (samples, channels, H, W) and their description;
    refused in one line where the model and the calibration data do not fit together."""
    model = type(source.model).__name__
    if not source.is_vision:
        raise SvdqError(f"--calib {settings.calib} is a folder of images but {model} takes "
                        "text; give a text file, wikitext or self")
    if not images.is_image_folder(settings.calib):
        raise SvdqError(f"{model} is an image model: give --calib DIR, a folder of PNG or JPEG "
                        "images")
    channels = getattr(source.model.config, "num_channels", 3)
    return images.calibration_pixels(source.tokenizer, Path(settings.calib).expanduser(),
                                     settings.calib_samples, settings.seed, channels, warn)
