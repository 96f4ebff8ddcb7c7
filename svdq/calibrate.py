"""Calibration: text -> token batches -> the inputs of the first block -> per-layer statistics.

Statistics are accumulated by forward hooks (Gram matrix XᵀX in float64, input sum, token
count); activations are never kept. Hooks are always removed, whatever happens. Where asked
for, `gradients` adds what the loss says about each layer (per-row Fisher, output sensitivity).
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from svdq.collect import Collector, collect  # noqa: F401 - re-exported: the walk's statistics
from svdq.errors import SvdqError
from svdq.hf import conv1d_type


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


def check_length(tokenizer, text: str, samples: int, length: int, what: str) -> None:
    """Refuse, before the model loads, a text too short for `samples` × `length` tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    _chunks(ids, samples, length, 0, what)


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


def gradients(model: nn.Module, ids: torch.Tensor, modules: dict[str, nn.Module], batch_size: int,
              causal: bool, seed: int, report: Callable[[str, int, int], None] | None = None
              ) -> dict[str, tuple[torch.Tensor, float]]:
    """Gradient statistics of each named linear layer: (row_fisher, grad2).

    row_fisher (float64, (out,)): Σ_s Σ_j (∂L_s/∂W_ij)², the diagonal empirical Fisher summed
    over each row of W (out, in) — per-sample gradients, so one sample per backward (the
    squares of a batch's summed gradient would not be these; `batch_size` does not batch here).
    grad2: Σ_t ‖∂L_s/∂y_t‖² over every sample's tokens, y_t the layer's output for token t.

    The loss L_s of a sample: for a causal LM (`model` with its LM head), the mean next-token
    cross-entropy (as transformers computes it for labels=ids). Otherwise (a bare encoder) a
    random-projection surrogate, L_s = mean_t rᵀ h_t over the last hidden states h_t with
    r ~ N(0, I) drawn per sample from a generator seeded by `seed`: since E_r[r rᵀ] = I,
    E_r[(∂L/∂y)(∂L/∂y)ᵀ] = J Jᵀ / T² (J the Jacobian of the final hidden states in y) is the
    Gauss–Newton matrix of the output, so grad2 measures how far an error in the layer's output
    moves the final hidden states.

    Only the target weights take part in autograd (every other parameter's requires_grad is off
    while this runs), each weight's gradient is read and dropped as soon as it is accumulated,
    and only output-gradient norms are kept: no activation or gradient outlives its backward.
    Every parameter's requires_grad and .grad are restored and hooks removed, whatever happens;
    the model is left in eval mode. Runs under autograd even when called under no_grad.
    """
    report = report or (lambda stage, done, total: None)
    if causal and ids.shape[1] < 2:
        raise SvdqError("gradient statistics of a causal LM need calibration sequences of at "
                        "least 2 tokens (a next token to predict); raise --calib-len")
    conv1d = conv1d_type()
    device = next(model.parameters()).device
    fisher = {n: torch.zeros(m.weight.shape[-1] if conv1d is not None and isinstance(m, conv1d)
                             else m.weight.shape[0], dtype=torch.float64, device=m.weight.device)
              for n, m in modules.items()}
    grad2 = {n: torch.zeros((), dtype=torch.float64, device=m.weight.device)
             for n, m in modules.items()}

    def output_hook(name: str) -> Callable:
        def hook(module, args, output):
            y = output[0] if isinstance(output, tuple) else output
            if y.requires_grad:
                y.register_hook(accumulate)

        def accumulate(g: torch.Tensor) -> None:  # returns None: the gradient flows on unchanged
            grad2[name].add_(g.detach().double().pow(2).sum())
        return hook

    def weight_hook(name: str, module: nn.Module) -> Callable:
        transposed = conv1d is not None and isinstance(module, conv1d)  # Conv1D: (in, out)

        def hook(param):
            g = param.grad.detach()
            fisher[name] += g.double().pow(2).sum(0 if transposed else 1)
            param.grad = None  # read once, never accumulated across samples
        return hook

    params = list({id(p): p for p in model.parameters()}.values())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    weights = {id(m.weight) for m in modules.values()}
    handles = []
    generator = torch.Generator().manual_seed(seed)

    def loss_of(sample: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(sample)
        if causal:  # what labels=sample computes, without transformers' warning on loss_type
            logits = model(input_ids=sample, attention_mask=mask, use_cache=False).logits
            return nn.functional.cross_entropy(logits[0, :-1].float(), sample[0, 1:])
        out = model(input_ids=sample, attention_mask=mask, output_hidden_states=True)
        h = getattr(out, "last_hidden_state", None)
        h = out.hidden_states[-1] if h is None else h
        r = torch.randn(h.shape[-1], generator=generator, dtype=torch.float64)
        return (h @ r.to(h.device, h.dtype)).mean()

    model.eval()
    try:
        for p in params:
            p.grad = None
            p.requires_grad_(id(p) in weights)
        for n, m in modules.items():
            handles.append(m.register_forward_hook(output_hook(n)))
            handles.append(m.weight.register_post_accumulate_grad_hook(weight_hook(n, m)))
        total = ids.shape[0]
        report("gradients", 0, total)
        with torch.enable_grad():
            for i in range(total):
                loss_of(ids[i: i + 1].to(device)).backward()
                report("gradients", i + 1, total)
    finally:
        for handle in handles:
            handle.remove()
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
    return {n: (fisher[n], float(grad2[n])) for n in modules}


def final_states(model: nn.Module, ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """An encoder's last hidden states on each batch of `ids`, float32."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            batch = ids[i: i + batch_size].to(device)
            res = model(input_ids=batch, attention_mask=torch.ones_like(batch),
                        output_hidden_states=True)
            h = getattr(res, "last_hidden_state", None)
            out.append((res.hidden_states[-1] if h is None else h).float())
    return out


def loss(model: nn.Module, ids: torch.Tensor, batch_size: int, causal: bool,
         reference: list[torch.Tensor] | None = None) -> float:
    """How well `model` does on the calibration sequences: for a causal LM its mean next-token
    cross-entropy; for an encoder the relative squared error of its last hidden states against
    `reference` (the source's, `final_states`)."""
    if not causal:
        if reference is None:
            raise ValueError("an encoder's loss needs the source's final states")
        err = ref = 0.0
        for h, h0 in zip(final_states(model, ids, batch_size), reference):
            err += float((h - h0).double().pow(2).sum())
            ref += float(h0.double().pow(2).sum())
        return err / (ref or 1.0)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(ids.shape[0]):  # one sequence at a time: logits are vocabulary-wide
            seq = ids[i: i + 1].to(device)
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
            total += float(nn.functional.cross_entropy(logits[0, :-1].float(), seq[0, 1:],
                                                       reduction="sum"))
            count += seq.shape[1] - 1
    return total / max(count, 1)
