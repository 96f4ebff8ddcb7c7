"""Compression schedules: single-shot, layer-by-layer and progressive, with fine-tuning.

- `single`: one compression at the target (then fine-tuning, if asked for);
- `progressive`: `stages` compressions whose target falls geometrically from near-lossless
  (0.5 × fp16 for a budget — 8-bit's bytes —, eps 0.01) to the one asked for;
- `layerwise`: the blocks in `groups` contiguous groups, front to back; stage g compresses
  the blocks of groups 1 … g at the target (the blocks after them stay as they are).

Every stage compresses the model the previous stage left — its artifact, fine-tuned and
de-quantized (`artifact.export` to float32) — and is fine-tuned by distillation from the
original source; the last stage's artifact, at the target, is the result, so the three
schedules end at the same budget. The stages' artifacts live in a work folder beside the
output and are removed at the end, whatever happens.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from svdq.config import Settings
from svdq.errors import SvdqError

SCHEDULES = ("single", "layerwise", "progressive")
START_RATIO = 0.5  # a budget at 8-bit's bytes is about lossless (benchmarks/RESULTS.md)
START_EPS = 0.01


def check(settings: Settings, schedule: str, n: int) -> None:
    """Refuse, before any model loads, a schedule the settings cannot take."""
    if schedule not in SCHEDULES:
        raise SvdqError(f"--schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    if schedule == "single":
        return
    if n < 1:
        raise SvdqError(f"--{'stages' if schedule == 'progressive' else 'groups'} must be at "
                        f"least 1, got {n}")
    if settings.budget_bytes is not None:
        raise SvdqError(f"--schedule {schedule} takes --ratio or --eps, not --size; give the "
                        "budget as --ratio")
    if schedule == "layerwise" and settings.include:
        raise SvdqError("--schedule layerwise chooses the layers of each group itself; use "
                        "--exclude instead of --include")


def stage_settings(settings: Settings, schedule: str, n: int, blocks: tuple[str, int]) -> list[Settings]:
    """The settings of each stage; `blocks`: the model's block list name and length."""
    check(settings, schedule, n)
    if schedule == "single":
        return [settings]
    if schedule == "progressive":
        if settings.budgeted:
            r = settings.budget_ratio
            start = max(START_RATIO, r)
            return [dataclasses.replace(settings, budget_ratio=start * (r / start) ** (s / n))
                    for s in range(1, n + 1)]
        e = settings.eps
        start = min(START_EPS, e)
        return [dataclasses.replace(settings, eps=start * (e / start) ** (s / n))
                for s in range(1, n + 1)]
    prefix, count = blocks
    if n > count:
        raise SvdqError(f"--groups {n} is more than the model's {count} blocks")
    ends = [round(count * g / n) for g in range(1, n + 1)]
    return [dataclasses.replace(settings, include=tuple(f"{prefix}.{i}.*" for i in range(end)))
            for end in ends]


def run(model: str, output: Path, settings: Settings, schedule: str, n: int, opt, overwrite: bool,
        shard_bytes: int, progress: Callable[[str, int, int], None],
        warn: Callable[[str], None], revision: str | None = None, stream: bool = True) -> dict:
    """Compress `model` into `output` by `schedule` in `n` stages or groups, fine-tuning each
    stage's artifact by `opt` (a `finetune.Options`; None or 0 steps: no fine-tuning); returns
    the final manifest. With `stream` every stage reads its source block by block, as a plain
    compress does (the same artifacts; on SmolLM2 a compress took 761 s streamed against 877 s
    whole); the teacher of the fine-tuning is the one model held whole."""
    from svdq import artifact
    from svdq.artifact.export import export
    from svdq.models import load as hf
    from svdq.models.layers import blocks_of
    from svdq.pipeline.compress import compress
    from svdq.recovery import finetune, tuned

    tune = opt is not None and opt.steps > 0
    progress(f"loading {model}", 0, 1)
    original = hf.load_source(model, revision=revision, dtype=settings.dtype, stream=stream,
                              report=progress)
    if tune and opt.seq_len is not None:  # refused now, not after the first stage's minutes
        from svdq.evaluate import max_context

        finetune.check_length(opt.seq_len, max_context(original.model), "--finetune-seq-len")
    prefix, blocks = blocks_of(original.model)
    dtype = original.stream_dtype or next(original.model.parameters()).dtype
    stages = stage_settings(settings, schedule, n, (prefix, len(blocks)))
    teacher = None
    if tune:
        import copy

        if original.weights is None:
            teacher = tuned.float32(copy.deepcopy(original.model)).eval()
        else:  # a streamed source's blocks rest on meta: the teacher is read whole
            teacher = tuned.float32(hf.load_source(model, revision=revision,
                                                   dtype=settings.dtype).model).eval()
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.schedule-", dir=output.resolve().parent))
    record = {"schedule": schedule, "stages": []}
    source = original
    try:
        for s, st in enumerate(stages):
            last = s == len(stages) - 1
            start = time.perf_counter()
            folder = output if last and not tune else work / f"stage{s + 1}"
            with artifact.writing(folder, overwrite and folder == output, shard_bytes,
                                  artifact.float_storage(source)) as pending:
                result = compress(source, st, _staged(progress, s, len(stages)), warn,
                                  sink=pending.tensors, scratch=pending.tmp / ".scratch")
                if last:
                    result.notes.append(f"compressed by the {schedule} schedule in {len(stages)} "
                                        "stages (manifest `schedule`)")
                manifest = pending.finish(source, result, st)
            entry = {"stage": s + 1, "eps": None if st.budgeted else st.eps,
                     "ratio": st.budget_ratio, "include": list(st.include),
                     "target_bytes": manifest["totals"]["target_bytes"],
                     "compress_seconds": round(time.perf_counter() - start, 1)}
            record["stages"].append(entry)
            if tune:
                start = time.perf_counter()
                tuned_at = output if last else work / f"stage{s + 1}-tuned"
                rec = finetune.finetune(folder, tuned_at, opt, overwrite and last, settings.device,
                                        _staged(progress, s, len(stages)), warn, teacher)
                entry.update(val_loss_before=rec["val_loss_before"],
                             val_loss_after=rec["val_loss_after"], steps_run=rec["steps_run"],
                             finetune_seconds=round(time.perf_counter() - start, 1))
                folder = tuned_at
            if last:
                break
            plain = work / f"stage{s + 1}-float"  # the next stage's source, in the model's dtype
            export(folder, "hf", plain, dtype=str(dtype).removeprefix("torch."))
            nxt = hf.load_source(str(plain), stream=stream)
            source = dataclasses.replace(original, model=nxt.model, weights=nxt.weights,
                                         stream_dtype=nxt.stream_dtype, released={})
            for old in (work / f"stage{s + 1}", work / f"stage{s + 1}-tuned", work / f"stage{s}-float"):
                shutil.rmtree(old, ignore_errors=True)
        return artifact.annotate(output, schedule=record)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _staged(progress, s: int, total: int):
    """Progress whose stage names say which schedule stage they belong to."""
    return lambda stage, done, of: progress(f"stage {s + 1}/{total} {stage}", done, of)
