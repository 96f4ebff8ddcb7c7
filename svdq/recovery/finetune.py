"""`svdq finetune`: win back by distillation from the source model what compression lost.

The student is the artifact as stored (`tuned.prepare`: the scales of its quantized parts, Σ,
sparse terms' values, biases and norms train; codes stay); the teacher is the artifact's source
model. The loss (`losses.distill_loss`) is the KL divergence of the next-token distributions
(causal LMs), 1 − cosine of the mean-pooled last hidden states (encoders) or the KL divergence
of the class distributions (image classifiers), on sequences of the training text or on
training images; the loss on held-out data is measured every `eval_every` steps, the best state
kept, and training stops early when it has not improved `patience` times in a row. The result
is a new artifact with the same plan, tensor keys, dtypes and bytes; its manifest records the
recovery.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from svdq import __version__, runtime
from svdq.artifact import SHARD_BYTES, card, locate, move_into_place, outdir, read, writing
from svdq.artifact.writer import INDEX
from svdq.errors import SvdqError
from svdq.recovery import coded, data, tuned
from svdq.recovery.losses import distill_loss

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Options:
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int | None = None  # None: SEQ_LEN, an encoder ENCODER_LEN (within its context)
    samples: int = 512  # training sequences at most (the text may hold fewer)
    val_samples: int = 8
    eval_every: int = 25
    patience: int = 3
    calib: str = "auto"
    seed: int = 0
    checkpointing: bool = False
    train_factors: bool = False  # the factors themselves (straight-through), not their scales
    train_codes: bool = False  # every quantized tensor's values through its grid (`coded`)
    codes_lr: float | None = None  # their values' peak learning rate (grid steps); None: CODES_LR
    train_embedding: bool = False  # the token embedding and output head where stored in float
    bf16: bool = False  # training steps' matmuls in bfloat16 (autocast); validation in float32
    ce_weight: float = 0.0  # a causal LM's loss adds this × cross-entropy on the next tokens

    def check(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "samples", "val_samples", "eval_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SvdqError(f"--{name.replace('_', '-')} must be at least 1, got "
                                f"{getattr(self, name)}")
        if self.patience < 1:
            raise SvdqError(f"--patience must be at least 1, got {self.patience}")
        for flag, v in (("--lr", self.lr), ("--codes-lr", self.codes_lr)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise SvdqError(f"{flag} must be a positive number, got {v}")
        if not (math.isfinite(self.ce_weight) and self.ce_weight >= 0):
            raise SvdqError(f"--ce-weight must be 0 or a positive number, got {self.ce_weight}")
        if self.train_codes and self.train_factors:
            raise SvdqError("--train-codes already trains the factors' codes; drop --train-factors")


# The codes' latent values count grid steps (`coded.Coded`), so their learning rate is a
# fraction of a step per step for every tensor. MiniLM at 0.2 × fp16, 120 steps (RESULTS.md,
# Recovery): similarity 0.8923 with the scales alone, 0.9031 with the codes at 0.02; at 0.05
# they churn and the held-out loss triples.
CODES_LR = 0.02

LOSSES = {"causal": "kl_next_token", "encoder": "1-cos_pooled", "images": "kl_class"}
SEQ_LEN = 256  # tokens per training sequence by default
# An encoder's loss pools whole sequences, so it is tuned for texts as long as its training
# sequences: on MiniLM 256 tokens lowered sentence similarity, 128 did not (RESULTS.md,
# Recovery: MiniLM). Its default, and longer ones asked for get a warning.
ENCODER_LEN = 128


def check_length(seq_len: int, context: int | None, flag: str = "--seq-len") -> None:
    """Refuse training sequences longer than the model's positions (`context`, None: no limit)."""
    if context is not None and seq_len > context:
        raise SvdqError(f"{flag} {seq_len} is longer than the model's {context} positions; "
                        f"give {flag} {context} or less")


def _checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in the backward instead of keeping them."""
    from torch.utils.checkpoint import checkpoint

    from svdq.models.layers import blocks_of

    _, blocks = blocks_of(model)
    for block in blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


@torch.no_grad()
def _val_loss(student, teacher, val, batch_size, causal, ce_weight=0.0) -> float:
    total = 0.0
    for i in range(0, len(val), batch_size):
        chunk = val[i: i + batch_size]
        total += float(distill_loss(student, teacher, chunk, causal, ce_weight=ce_weight)
                       ) * len(chunk)
    return total / len(val)


def train(student: nn.Module, teacher: nn.Module, plain: dict, train_ids: torch.Tensor,
          val_ids: torch.Tensor, causal: bool, opt: Options,
          progress: Progress | None = None) -> dict:
    """Fine-tune `student` in place; returns the record of the run. `plain`: {key: (parameter,
    stored dtype)} of the norms and biases outside the tuned layers. The student ends in its
    best state (on the held-out loss), rounded to what will be stored."""
    layers = [m for m in student.modules() if isinstance(m, tuned.TunedLinear)]
    params = [p for p in student.parameters() if p.requires_grad]
    for m in layers:
        m.qat = False  # the loss of the artifact as stored, before any step
    before = _val_loss(student, teacher, val_ids, opt.batch_size, causal, opt.ce_weight)
    for m in layers:
        m.qat = True
    latent = {id(m.latent) for m in student.modules() if isinstance(m, coded.Coded)}
    groups = [{"params": [p for p in params if id(p) not in latent]},
              {"params": [p for p in params if id(p) in latent], "lr": opt.codes_lr or CODES_LR}]
    optim = torch.optim.AdamW([g for g in groups if g["params"]], lr=opt.lr, weight_decay=0.0)
    warm = max(1, opt.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda i: min((i + 1) / warm, max(0.0, (opt.steps - i) / max(1, opt.steps - warm))))
    gen = torch.Generator().manual_seed(opt.seed)
    order = torch.empty(0, dtype=torch.long)
    best, bad, curve, losses = before, 0, [[0, before]], []
    best_state = [p.detach().clone() for p in params]  # step 0 wins if no step improves on it
    start, step = time.perf_counter(), 0
    for step in range(1, opt.steps + 1):
        if len(order) < opt.batch_size:
            order = torch.cat([order, torch.randperm(len(train_ids), generator=gen)])
        pick, order = order[: opt.batch_size], order[opt.batch_size:]
        loss = distill_loss(student, teacher, train_ids[pick], causal, backward=True,
                            bf16=opt.bf16, ce_weight=opt.ce_weight)
        if not torch.isfinite(loss):
            raise SvdqError(f"the loss became {float(loss)} at step {step}; lower --lr")
        nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress:
            progress(f"fine-tuning: loss {losses[-1]:.4f}, held-out {curve[-1][1]:.4f} "
                     f"(best {best:.4f})", step, opt.steps)
        if step % opt.eval_every and step != opt.steps:
            continue
        val = _val_loss(student, teacher, val_ids, opt.batch_size, causal, opt.ce_weight)
        curve.append([step, val])
        if val < best:
            best, bad = val, 0
            best_state = [p.detach().clone() for p in params]
        else:
            bad += 1
            if bad >= opt.patience:
                break
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for p, b in zip(params, best_state):
            p.copy_(b)
        for m in layers:
            m.settle()
        for p, dtype in plain.values():  # norms and biases, as their stored dtype holds them
            p.copy_(p.to(dtype).float())
    after = _val_loss(student, teacher, val_ids, opt.batch_size, causal, opt.ce_weight)
    return {"steps_run": step, "best_step": min(curve, key=lambda c: c[1])[0],
            "early_stopped": step < opt.steps,
            "loss": LOSSES["images" if train_ids.is_floating_point() else
                           "causal" if causal else "encoder"]
            + (f" + {opt.ce_weight:g}*ce_next_token" if opt.ce_weight else ""),
            "val_loss_before": before, "val_loss_after": after, "val_curve": curve,
            "train_loss_first": losses[0], "train_loss_last": losses[-1],
            "train_seconds": round(seconds, 1), "seconds_per_step": round(seconds / step, 2)}


def finetune(path: str | Path, out: Path, opt: Options = Options(), overwrite: bool = False,
             device: str = "cpu", progress: Progress | None = None,
             warn: Callable[[str], None] | None = None, teacher: nn.Module | None = None
             ) -> dict:
    """Fine-tune artifact `path` into a new artifact at `out`; returns the recovery record
    written into its manifest. Nothing is written unless it all succeeds; `path` is only read.
    `teacher`: the source model in float32 where the caller holds it (else it is loaded as the
    manifest names it)."""
    import transformers

    from svdq.evaluate import load_baseline, max_context

    opt.check()
    if opt.train_codes and opt.codes_lr is None:
        opt = replace(opt, codes_lr=CODES_LR)  # (the record says what ran)
    path, out = locate(path), Path(out)
    manifest = read(path)
    images = manifest.get("calibration", {}).get("kind") == "images"
    outdir.apart(path, out, "the fine-tuned artifact")
    outdir.check(out, overwrite)
    data.check(opt.calib, images)
    if opt.ce_weight and images:
        raise SvdqError("--ce-weight trains on a text's next tokens, and this artifact is an "
                        "image model; drop --ce-weight")
    device = str(runtime.check_device(device))
    if progress:
        progress("loading: source and artifact", 0, 2)
    if teacher is None:
        try:
            teacher = tuned.float32(load_baseline(manifest).model)
        except SvdqError as e:
            raise SvdqError(str(e).replace("drop --baseline", "fine-tuning distils from it")) from None
    teacher = teacher.to(device).eval()
    context = None if images else max_context(teacher)
    causal = bool(getattr(teacher, "can_generate", lambda: False)())
    if opt.ce_weight and not causal:
        raise SvdqError("--ce-weight trains on a text's next tokens, and this artifact is not a "
                        "causal language model; drop --ce-weight")
    asked = opt.seq_len
    if asked is None:
        default = SEQ_LEN if images or causal else ENCODER_LEN
        opt = replace(opt, seq_len=default if context is None else min(default, context))
    check_length(opt.seq_len, context)
    student = runtime.load(path, dtype="float32", verify=False)
    stored = runtime.load_tensors(path, manifest)
    plain = {k: (p, stored[k].dtype) for k, p in tuned.prepare(student, manifest, opt.train_factors,
                                                           opt.train_codes,
                                                           opt.train_embedding).items()
             if k in stored}
    student.to(device).eval()  # eval: no dropout; the gradients flow all the same
    if opt.checkpointing:
        _checkpoint_blocks(student)
    if warn and not images and not causal and asked is not None and asked > ENCODER_LEN:
        warn(f"an encoder distils on the pooled embedding of each whole sequence, so at "
             f"{opt.seq_len} tokens it is tuned for texts that long (on MiniLM, 256-token "
             "sequences lowered the similarity of sentences); train at about the length of the "
             "texts it embeds (finetune --seq-len, compress --finetune-seq-len; 32 for "
             "sentences)")
    if images:
        processor = transformers.AutoImageProcessor.from_pretrained(str(path))
        train_ids, val_ids, text = data.pictures(processor, opt.calib, opt.samples,
                                                 opt.val_samples, opt.seed,
                                                 teacher.config.num_channels)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        train_ids, val_ids, text = data.sequences(teacher, tokenizer, opt.calib, opt.samples,
                                                  opt.val_samples, opt.seq_len, opt.seed,
                                                  causal, progress, warn)
    record = train(student, teacher, plain, train_ids.to(device), val_ids.to(device), causal,
                   opt, progress)
    del teacher
    trained = [m for m in student.modules() if isinstance(m, tuned.TunedLinear)]
    record = {"svdq_version": __version__, "from": str(path.resolve()), **record,
              "options": {k: v for k, v in asdict(opt).items() if k not in ("calib",)},
              "text": text, "trained": {
                  "lowrank_terms": sum(1 for m in trained if m.rank),
                  "biases_and_norms": len(plain),
                  "parameters": sum(p.numel() for p in student.parameters() if p.requires_grad)}}
    new = {}
    for m in trained:
        new.update(m.stored_tensors(manifest["format_version"]))
    new.update({k: p.detach().to(dtype) for k, (p, dtype) in plain.items()})
    _write(path, out, manifest, stored, new,
           {"recovery": [*manifest.get("recovery", []), record]}, overwrite)
    return record


_NOT_COPIED = {runtime.MANIFEST, INDEX, card.CARD, card.EVALS, outdir.EXPORT}


def _write(path: Path, out: Path, manifest: dict, stored: dict, new: dict, fields: dict,
           overwrite: bool) -> None:
    """The input artifact with the tensors in `new` replaced (same keys, shapes and dtypes)
    and the manifest `fields` set."""
    for key, t in list(new.items()):
        old = stored.get(key)
        if old is not None and t.numel() == old.numel():
            t = new[key] = t.reshape(old.shape)  # (scales: the file's own layout)
        if old is None or old.shape != t.shape or old.dtype != t.dtype:
            raise SvdqError(f"fine-tuning changed the stored form of {key!r}; this is a bug in svdq")
    shard = max([SHARD_BYTES] + [(path / f).stat().st_size for f in runtime.tensor_files(manifest)])
    with writing(out, overwrite, shard) as pending:
        pending.tensors.add({k: new.get(k, t) for k, t in stored.items()})
        files = pending.tensors.close()
        if pending.tensors.total_bytes != manifest["totals"]["artifact_tensor_bytes"]:
            raise SvdqError("fine-tuning changed the stored bytes; this is a bug in svdq")
        body = {k: v for k, v in manifest.items() if k not in ("sha256", "shards", "manifest_sha256")}
        body.update(fields)
        body.update({"sha256": files[runtime.TENSORS]} if runtime.TENSORS in files
                    else {"shards": files})
        body["manifest_sha256"] = runtime.manifest_digest(body)
        tmp = pending.tmp
        (tmp / runtime.MANIFEST).write_text(json.dumps(body, indent=1))
        for f in sorted(path.iterdir()):  # config, tokenizer, loader, generation config
            if f.is_file() and f.name not in _NOT_COPIED and not f.name.endswith(".safetensors") \
                    and not f.name.startswith("."):
                shutil.copyfile(f, tmp / f.name)
        try:
            card.write(tmp, body)
        except (KeyError, TypeError, ValueError, AttributeError, OSError):
            pass  # documentation only
        outdir.publish_modes(tmp)
        move_into_place(tmp, pending.out)
