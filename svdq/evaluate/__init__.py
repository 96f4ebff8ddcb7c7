"""Evaluate a model: sliding-window perplexity, output similarity of two encoders, sizes
(and image accuracy: `svdq.evaluate.accuracy`).

The functions take models, tokenizers and tensors and return plain dicts, so `svdq eval` and a
sweep over settings share them. `load_subject`/`load_baseline` resolve what to evaluate: an
artifact folder (it has svdq.json) or anything `svdq.models.load.load_source` takes, and an artifact's
source as its manifest records it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from svdq.errors import SvdqError

Progress = Callable[[str, int, int], None]  # (stage, done, total), as in svdq.pipeline



@dataclass
class Subject:
    """A model to evaluate, its tokenizer, and its manifest where it is an svdq artifact."""

    model: nn.Module
    tokenizer: object
    label: str
    manifest: dict | None = None
    notes: list[str] = field(default_factory=list)


def load_subject(spec: str, device: str = "cpu") -> Subject:
    """An artifact folder (svdq.json inside) via svdq.artifact, else via svdq.models.load.load_source."""
    from svdq import artifact
    from svdq.models import load as hf

    folder = artifact.locate(spec, required=False)  # a hub repo holding an artifact: downloaded
    if (folder / "svdq.json").is_file():
        spec = str(folder)
        manifest = artifact.read(spec, verify=False)  # load() below checks the checksum once
        # float layers: the same stored tensors, faster to run than de-quantizing per forward
        model = artifact.load(spec, device=device, dequantize=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = hf.preprocessor(type(model), spec)
        return Subject(model, tokenizer, spec, manifest)
    source = hf.load_source(spec)
    return Subject(source.model.to(device).eval(), source.tokenizer, spec, notes=source.notes)


def load_baseline(manifest: dict, device: str = "cpu") -> Subject:
    """The model an artifact was compressed from, in the dtype the artifact holds."""
    from svdq.models import load as hf

    src = manifest["source"]
    dtype = manifest.get("dtype", "auto")
    try:
        source = hf.load_source(src["id"], revision=src.get("revision"),
                                dtype=dtype if dtype in hf.DTYPES else "auto")
    except SvdqError as e:
        raise SvdqError(f"the artifact's source {src['id']} cannot be loaded ({e}); run svdq eval "
                        "from where the source path is valid, or drop --baseline") from None
    notes = list(source.notes)
    if src.get("sha256") and source.sha256 and src["sha256"] != source.sha256:
        notes.append(f"{src['id']} has changed since it was compressed (sha256 differs)")
    return Subject(source.model.to(device).eval(), source.tokenizer, src["id"], notes=notes)


# ----------------------------------------------------------------------------- sizes
def size_of(manifest: dict) -> dict:
    """Bytes of an artifact's tensors and their ratio to the whole model in float16."""
    t = manifest["totals"]
    return {"bytes": t["artifact_tensor_bytes"], "fp16_bytes": t["checkpoint_fp16_bytes"],
            "ratio_fp16": t["checkpoint_ratio_fp16"]}


from svdq.evaluate.perplexity import (CTX_CAP, DEFAULT_MAX_TOKENS, check_options,  # noqa: E402,F401
                                      check_windows, default_ctx, max_context, perplexity,
                                      read_text, tokenize, windows)
from svdq.evaluate.similarity import embed, read_lines, similarity  # noqa: E402,F401
