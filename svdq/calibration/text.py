"""Calibration text -> token ids (samples, length): a text file, WikiText-2, or text sampled
from the model itself; and the checks that refuse a bad file before any model loads."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from svdq.errors import SvdqError


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SvdqError(f"cannot read calibration file {path} ({e.__class__.__name__}); "
                        "give a readable UTF-8 text file") from None
    if not text.strip():
        raise SvdqError(f"calibration file {path} is empty; give a file with text in it")
    return text


def _wikitext() -> str | None:
    """WikiText-2 (raw) train, or None where `datasets` or the hub cannot be had."""
    try:
        import datasets
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
    except Exception:  # noqa: BLE001 - any failure here means "not available": fall back
        return None
    return "\n\n".join(data["text"])


def _chunks(ids: list[int], samples: int, length: int, seed: int, what: str) -> torch.Tensor:
    n = len(ids) // length
    if n < samples:
        raise SvdqError(f"{what} has {len(ids):,} tokens, too short for {samples} samples of "
                        f"{length} tokens; give a longer text or lower --calib-samples/--calib-len")
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples].sort().values
    data = torch.tensor(ids[: n * length]).view(n, length)
    return data[pick]


def check_file(path: Path) -> str:
    """The text of calibration file `path`, refused in one line if it is no usable text; called
    before the model loads, so a bad file costs seconds, not minutes."""
    if not path.is_file():
        raise SvdqError(f"calibration file {path} does not exist; give a text file, wikitext or self")
    text = _read_text(path)
    if "\x00" in text:
        raise SvdqError(f"calibration file {path} holds NUL bytes (a binary file?); give a "
                        "readable UTF-8 text file")
    return text


_CHECKED: list = []  # (tokenizer, text, ids) of the last `check_length`, for `_tokens` once


def _tokens(tokenizer, text: str) -> list[int]:
    """`text`'s token ids; those `check_length` made of the same text with the same tokenizer
    (`models.load.preprocessor` hands its tokenizer on) taken instead, once."""
    if _CHECKED and _CHECKED[0][0] is tokenizer and _CHECKED[0][1] == text:
        return _CHECKED.pop()[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def check_length(tokenizer, text: str, samples: int, length: int, what: str) -> None:
    """Refuse, before the model loads, a text too short for `samples` × `length` tokens."""
    _CHECKED.clear()
    ids = _tokens(tokenizer, text)
    _chunks(ids, samples, length, 0, what)
    _CHECKED.append((tokenizer, text, ids))


class _Counter:
    """A stopping criterion that never stops: it reports each decoding step as progress."""

    def __init__(self, report: Callable[[int], None]) -> None:
        self.report = report

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.report(input_ids.shape[1])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _self_text(model: nn.Module, tokenizer, samples: int, length: int, batch_size: int,
               seed: int, report: Callable[[str, int, int], None] | None = None) -> torch.Tensor:
    """Token sequences sampled from the model itself, starting from its BOS token; `report`
    sees the sampled tokens as (stage, done, total)."""
    from transformers import StoppingCriteriaList

    start = tokenizer.bos_token_id
    if start is None:
        start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = []
    # decoding is bound by per-step overhead, not FLOPs: wide batches cost little more per step
    batch_size = max(batch_size, 32)
    total = samples * length
    for i in range(0, samples, batch_size):
        n = min(batch_size, samples - i)
        prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
        counter = _Counter(lambda t, i=i, n=n: report and report("sampling calibration text",
                                                                   i * length + n * t, total))
        with torch.no_grad():
            seq = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                 top_k=0, top_p=1.0, max_new_tokens=length - 1,
                                 min_new_tokens=length - 1, pad_token_id=start,
                                 stopping_criteria=StoppingCriteriaList([counter]))
        out.append(seq[:, :length].cpu())
    return torch.cat(out)


def calibration_ids(model: nn.Module | Callable[[], nn.Module], tokenizer, calib: str,
                    samples: int, length: int,
                    batch_size: int, seed: int, causal: bool,
                    report: Callable[[str, int, int], None] | None = None,
                    warn: Callable[[str], None] | None = None) -> tuple[torch.Tensor, dict]:
    """(samples, length) token ids and a description of where they came from. `warn` hears
    of a fallback at once (the sampling it starts takes minutes); `report` sees its progress."""
    info = {"source": calib, "samples": samples, "length": length, "tokens": samples * length}
    text, what = None, calib
    if calib not in ("auto", "wikitext", "self"):
        text = _read_text(Path(calib))
    elif calib in ("auto", "wikitext"):
        text, what = _wikitext(), "WikiText-2 train"
        if text is None:
            if not causal:
                raise SvdqError("WikiText-2 cannot be loaded here (offline, or `datasets` is not "
                                "installed); give calibration text with --calib FILE")
            info["warning"] = ("WikiText-2 could not be loaded (offline, or `datasets` missing): "
                               "calibrated on text sampled from the model itself")
            if warn is not None:
                warn(info["warning"].replace("calibrated on", "calibrating on"))
    if text is None:
        if not causal:
            raise SvdqError("--calib self needs a causal LM; give calibration text with --calib FILE")
        info["source"] = "self"
        if callable(model) and not isinstance(model, nn.Module):  # a function readying the model
            model = model()
        return _self_text(model, tokenizer, samples, length, batch_size, seed, report), info
    info["source"] = "wikitext" if what == "WikiText-2 train" else str(Path(calib).resolve())
    return _chunks(_tokens(tokenizer, text), samples, length, seed, what), info  # cut here
