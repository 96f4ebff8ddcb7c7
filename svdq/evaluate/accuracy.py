"""Accuracy of an image classifier on a labelled folder (one sub-folder per class): top-1 and
top-5, and where a reference model is given (the artifact's source), the agreement of the two
top-1 predictions and the mean KL of the predicted distributions to the reference's."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from svdq.calibration import images
from svdq.calibration.loss import kl_sum
from svdq.errors import SvdqError


def check_classifier(model: nn.Module, what: str) -> dict:
    """The model's labels ({index: name}); refused in one line where it classifies no images."""
    from svdq.models.load import is_vision

    labels = getattr(model.config, "id2label", None)
    if not is_vision(type(model)) or not labels:
        raise SvdqError(f"--accuracy measures image classifiers, and {what} "
                        f"({type(model).__name__}) is none; use --ppl or --similarity")
    return {int(k): v for k, v in labels.items()}


def batches(processor, data: list[tuple[Path, int]], channels: int,
            batch_size: int) -> Iterator[torch.Tensor]:
    """The pixel values of `data`'s images, `batch_size` at a time, as `processor` makes them."""
    for i in range(0, len(data), batch_size):
        yield images.pixels(processor, [p for p, _ in data[i: i + batch_size]], channels)


def logits_of(models: list[nn.Module], pixels: Iterable[torch.Tensor],
              report: Callable[[int], None] | None = None
              ) -> tuple[list[torch.Tensor], list[float]]:
    """(n, classes) float32 logits (on the CPU) of each model on the batches `pixels`, and
    the seconds each spent in its forwards (each batch is made once for all models);
    `report` hears the images done."""
    out: list[list[torch.Tensor]] = [[] for _ in models]
    spent = [0.0 for _ in models]
    done = 0
    with torch.no_grad():
        for batch in pixels:
            for j, model in enumerate(models):
                param = next(p for p in model.parameters() if p.is_floating_point())
                t0 = time.perf_counter()
                out[j].append(model(pixel_values=batch.to(param.device, param.dtype))
                              .logits.float().cpu())
                spent[j] += time.perf_counter() - t0
            done += len(batch)
            if report is not None:
                report(done)
    return [torch.cat(o) for o in out], spent


def scores(logits: torch.Tensor, labels: torch.Tensor,
           reference: torch.Tensor | None = None) -> dict:
    """top-1, top-5 (top-k for fewer than 5 classes) and, against `reference` logits, top-1
    agreement and mean KL(reference ‖ model)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    out = {"n": len(labels), "top1": float((top[:, 0] == labels).float().mean()),
           "top5": float((top == labels[:, None]).any(1).float().mean()), "top5_k": k}
    if reference is not None:
        kl = kl_sum(reference, logits) / len(labels)
        out["agreement"] = float((reference.argmax(1) == top[:, 0]).float().mean())
        out["kl"] = kl if math.isfinite(kl) else None
    return out


def accuracy(subjects: list, folder: Path, batch_size: int,
             report: Callable[[str, int, int], None] | None = None) -> dict:
    """Accuracy of each subject (`evaluate.Subject`) on `folder`; where there are two, the
    second is the first one's reference (its source)."""
    labels_of = check_classifier(subjects[0].model, subjects[0].label)
    data = images.labelled(folder, labels_of)
    labels = torch.tensor([y for _, y in data])
    channels = getattr(subjects[0].model.config, "num_channels", 3)
    logits, spent = logits_of([s.model for s in subjects],
                              batches(subjects[0].tokenizer, data, channels, batch_size),
                              lambda d: report and report("accuracy", d, len(data)))
    rows = [{"id": s.label, "images_per_s": len(data) / max(t, 1e-9)}
            for s, t in zip(subjects, spent)]
    for i, (row, lg) in enumerate(zip(rows, logits)):
        row.update(scores(lg, labels, logits[1] if len(logits) == 2 and i == 0 else None))
    return {"folder": str(folder), "images": len(data), "classes": len(set(labels.tolist())),
            "rows": rows}
