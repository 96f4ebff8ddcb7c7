"""Calibration: text -> token batches -> the inputs of the first block -> per-layer statistics.

Statistics are accumulated by forward hooks (Gram matrix XᵀX in float64, input sum, token
count); activations are never kept. Hooks are always removed, whatever happens.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from svdq.algo.factorize import LayerStats
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


def _self_text(model: nn.Module, tokenizer, samples: int, length: int, batch_size: int,
               seed: int) -> torch.Tensor:
    """Token sequences sampled from the model itself, starting from its BOS token."""
    start = tokenizer.bos_token_id
    if start is None:
        start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = []
    # decoding is bound by per-step overhead, not FLOPs: wide batches cost little more per step
    batch_size = max(batch_size, 32)
    for i in range(0, samples, batch_size):
        n = min(batch_size, samples - i)
        prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
        with torch.no_grad():
            seq = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                 top_k=0, top_p=1.0, max_new_tokens=length - 1,
                                 min_new_tokens=length - 1, pad_token_id=start)
        out.append(seq[:, :length].cpu())
    return torch.cat(out)


def calibration_ids(model: nn.Module, tokenizer, calib: str, samples: int, length: int,
                    batch_size: int, seed: int, causal: bool) -> tuple[torch.Tensor, dict]:
    """(samples, length) token ids and a description of where they came from."""
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
    if text is None:
        if not causal:
            raise SvdqError("--calib self needs a causal LM; give calibration text with --calib FILE")
        info["source"] = "self"
        return _self_text(model, tokenizer, samples, length, batch_size, seed), info
    info["source"] = "wikitext" if what == "WikiText-2 train" else str(Path(calib).resolve())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # long text is chunked here
    return _chunks(ids, samples, length, seed, what), info


class _Stop(Exception):
    """Raised inside the first block once its inputs are captured."""


def block_inputs(model: nn.Module, first_block: nn.Module, ids: torch.Tensor,
                 batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """Run the embeddings on each batch and capture what the first block receives.

    Returns one (hidden_states, other keyword arguments) pair per batch: the rest of the walk
    calls each block directly, so the head (lm_head) is never computed.
    """
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {**kwargs, **({} if not args[1:] else {"_args": args[1:]})}))
        raise _Stop

    device = next(model.parameters()).device
    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, ids.shape[0], batch_size):
            batch = ids[i: i + batch_size].to(device)
            with contextlib.suppress(_Stop), torch.no_grad():
                model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    kw = dict(kwargs)
    args = kw.pop("_args", ())
    with torch.no_grad():
        out = block(hidden, *args, **kw)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def collect(modules: dict[str, nn.Module]) -> Iterator[dict[str, LayerStats]]:
    """Accumulate LayerStats for each named module while the body runs forwards."""
    stats: dict[str, LayerStats] = {}
    last: dict = {}  # layers fed the same tensor (q, k, v) share one Gram product per batch

    def hook_for(name: str) -> Callable:
        def hook(module, args):
            src = args[0]
            x = src.detach()
            x = x.reshape(-1, x.shape[-1])
            # Same object, not modified in place since. Holding `src` keeps its memory from being
            # recycled for the next batch's input (a data_ptr key alone reused a stale Gram then).
            version = None if src.is_inference() else src._version
            if last.get("src") is not src or last.get("version") != version:
                x32 = x.float()
                last.update(src=src, version=version, gram=(x32.T @ x32).double(),
                            total=x32.sum(0).double(), abs_total=x32.abs().sum(0).double())
            st = stats.get(name)
            if st is None:
                stats[name] = LayerStats(last["gram"].clone(), last["total"].clone(), x.shape[0],
                                         last["abs_total"].clone())
            else:
                st.gram += last["gram"]
                st.total += last["total"]
                st.abs_total += last["abs_total"]
                st.tokens += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        last.clear()
