"""What a budget's judge compares, form by form: every candidate plan `svdq compress --size`
would judge for MiniLM at a byte budget (calibrated on the source's inputs, the model whole in
memory), its calibration loss, and how many layers take each stored form.

    python benchmarks/gptq/candidates.py [--size 5806080]

The numbers behind RESULTS.md's "floored plan" paragraph (results/gptq_minilm_candidates.md).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))


def form(option, block_size: int) -> str:
    """An option's stored form in a few words: 'int4/64', 'bnb4/256 + correction', 'kept'."""
    if option.kind == "keep":
        return "kept"
    base = f"{option.grid}{option.bits}/{option.block or block_size}"
    return {"residual": f"{base} + correction", "lowrank": f"low rank, {option.bits}-bit factors"
            }.get(option.kind, base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=5806080)
    args = parser.parse_args()

    from svdq import assets
    from svdq.algo.allocate import total
    from svdq.config import Settings
    from svdq.models import load
    from svdq.pipeline import budget
    from svdq.pipeline.inputs import calibration_ids
    from svdq.pipeline.judge import judge_of
    from svdq.pipeline.measured import measure
    from svdq.pipeline.analyse import analyse
    from svdq.pipeline.work import Clock
    from sweep import split_text

    calib, _, _ = split_text(assets.cache_dir() / "bench-text")
    source = load.load_source(str(assets.fetch("minilm")))
    settings = Settings(calib=str(calib), calib_len=128, budget_bytes=args.size, method="whiten")
    ids = calibration_ids(source, settings, lambda *a: None, {})
    works = analyse(source, settings, ids, lambda *a: None, Clock(), gradients=True)
    measured = measure(works, settings, lambda *a: None)
    judge = judge_of(source, works, ids, settings)
    print(f"MiniLM at {args.size:,} bytes\n\n| candidate | bytes | calibration loss | forms (layers) |"
          "\n|---|---|---|---|")
    for label, plan in budget.candidates(measured, args.size, settings.block_size):
        opts = [measured.options[n][i] for n, i in enumerate(plan)]
        loss = judge([budget.build_layer(w, o, settings) for w, o in zip(works, opts)])
        forms = Counter(form(o, settings.block_size) for o in opts)
        print(f"| {label} | {total(measured.options, plan)[0]:,} | {loss:.4f} | "
              + ", ".join(f"{k} ×{v}" for k, v in forms.most_common()) + " |", flush=True)


if __name__ == "__main__":
    main()
