"""Images in: a folder of PNG/JPEG files (searched recursively) turned into an image model's
pixel values by its own image processor, for calibration; the class-folder tree that
`svdq eval --accuracy` reads; and the checks that refuse a bad folder before a model loads."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch

from svdq.errors import SvdqError

SUFFIXES = (".png", ".jpg", ".jpeg")
BATCH = 64  # images opened and processed at once


def files(folder: Path) -> list[Path]:
    """The images under `folder`, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())


def is_image_folder(calib: str) -> bool:
    return calib not in ("auto", "wikitext", "self") and Path(calib).expanduser().is_dir()


def check_folder(folder: Path, what: str = "calibration folder") -> list[Path]:
    """The images of `folder`, refused in one line where there are none."""
    if not folder.is_dir():
        raise SvdqError(f"{what} {folder} does not exist; give a folder of PNG or JPEG images")
    found = files(folder)
    if not found:
        raise SvdqError(f"{what} {folder} holds no PNG or JPEG images; give a folder of images")
    return found


def _open(path: Path, channels: int):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        raise SvdqError(f"cannot read image {path}; remove it or replace it with a valid PNG "
                        "or JPEG file") from None


def pixels(processor, paths: list[Path], channels: int,
           report: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(n, channels, H, W) float32 pixel values of `paths`, as `processor` prepares them."""
    out = []
    for i in range(0, len(paths), BATCH):
        batch = [_open(p, channels) for p in paths[i: i + BATCH]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = processor(batch, return_tensors="pt")["pixel_values"]
        if values.shape[1] != channels:
            raise SvdqError(f"the image processor makes {values.shape[1]}-channel images where "
                            f"the model takes {channels}; save a processor that fits the model")
        out.append(values.float())
        if report is not None:
            report(min(i + BATCH, len(paths)), len(paths))
    return torch.cat(out)


def calibration_pixels(processor, folder: Path, samples: int, seed: int, channels: int,
                       warn: Callable[[str], None] | None = None) -> tuple[torch.Tensor, dict]:
    """`samples` images of `folder` drawn at random (seeded), as pixel values, and the
    manifest's description of them; all of them, with a warning, where there are fewer."""
    found = check_folder(folder)
    if len(found) < samples and warn is not None:
        warn(f"{folder} holds {len(found)} images, fewer than --calib-samples {samples}: "
             "calibrating on all of them")
    pick = torch.randperm(len(found), generator=torch.Generator().manual_seed(seed))
    chosen = [found[i] for i in sorted(pick[:samples].tolist())]
    values = pixels(processor, chosen, channels)
    info = {"source": str(folder.resolve()), "kind": "images", "samples": len(chosen),
            "image_size": list(values.shape[2:])}
    return values, info


def labelled(folder: Path, id2label: dict) -> list[tuple[Path, int]]:
    """(image, class index) for a folder with one sub-folder per class, named by the model's
    labels (`id2label`, any case) or by index (the ImageFolder convention)."""
    if not folder.is_dir():
        raise SvdqError(f"--accuracy {folder} does not exist; give a folder with one "
                        "sub-folder of images per class")
    by_name = {str(v).lower(): int(k) for k, v in id2label.items()}
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        name = sub.name.lower()
        if name in by_name:
            label = by_name[name]
        elif name.isdigit() and int(name) in {int(k) for k in id2label}:
            label = int(name)
        else:
            raise SvdqError(f"--accuracy: sub-folder {sub.name!r} names no class of the model "
                            f"(labels look like {str(next(iter(id2label.values())))!r}, or "
                            "indices 0, 1, …); rename it or remove it")
        out += [(p, label) for p in files(sub)]
    if not out:
        raise SvdqError(f"--accuracy {folder} holds no images in class sub-folders; give a "
                        "folder with one sub-folder of images per class")
    return out
