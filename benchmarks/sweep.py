"""Benchmark: the size-versus-quality frontier of svdq against quantization-only baselines.

    python benchmarks/sweep.py smollm2   # perplexity, ctx 1024, 16,384 evaluated tokens
    python benchmarks/sweep.py minilm    # sentence-embedding similarity to the source

Both use the offline assets (svdq.assets): the Wikipedia text is split by characters into a
calibration part (the first 80%) and an evaluation part (the last 20%), so the two never
overlap. MiniLM is evaluated on sentences cut from the evaluation part. Runs `svdq sweep` as a
child process and leaves results.json, results.csv and frontier.png in
benchmarks/results/sweep_<model>/, with the command in command.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from svdq import assets

HERE = Path(__file__).parent


def split_text(folder: Path) -> tuple[Path, Path, Path]:
    """calib.txt (first 80% of the wiki text), eval.txt (the rest), sentences.txt (from eval)."""
    text = assets.fetch("wiki").read_text(encoding="utf-8")
    cut = text.index("\n\n", int(0.8 * len(text)))  # at an article boundary
    folder.mkdir(parents=True, exist_ok=True)
    calib, evaluation, sentences = folder / "calib.txt", folder / "eval.txt", folder / "sentences.txt"
    calib.write_text(text[:cut], encoding="utf-8")
    evaluation.write_text(text[cut:].lstrip(), encoding="utf-8")
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text[cut:])]
    found = [s for s in found if 40 <= len(s) <= 300 and "\n" not in s]
    sentences.write_text("\n".join(found[:1000]) + "\n", encoding="utf-8")
    return calib, evaluation, sentences


def summary(results: dict) -> str:
    """The results as a markdown table, one row per variant in the order they ran."""
    metric = results["metric"]
    lines = [f"| method | bits | eps / budget | bytes vs fp16 | {metric} | low-rank layers | "
             "corrected layers | sparse layers | frontier |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        knob = (format(r["eps"], "g") if r["eps"] is not None
                else f"≤ {r['ratio']:g}" if r.get("ratio") is not None else "-")
        lines.append(f"| {r['method']} | {r['bits'] or '-'} | {knob} | "
                     f"{r['target_ratio_fp16']:.3f} | {r['quality']:.4f} | "
                     f"{r['lowrank_layers']}/{r['layers']} | "
                     f"{r.get('residual_layers', 0)}/{r['layers']} | "
                     f"{r.get('sparse_layers', 0)}/{r['layers']} | {'★' if r['pareto'] else ''} |")
    stages = ", ".join(f"{k} {v} s" for k, v in results["analysis_stages_s"].items())
    evals = sum(r["eval_s"] for r in results["rows"])
    lines += ["", f"Analysis once for all settings: {results['analysis_s']} s ({stages}); "
              f"evaluation of {len(results['rows'])} variants: {evals:.0f} s in all."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["smollm2", "minilm"])
    parser.add_argument("--eps", default="0.02,0.05,0.1,0.2")
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--method", default="svd")
    parser.add_argument("--residual", action="store_true",
                        help="also the quantized weights with low-rank corrections")
    parser.add_argument("--ratio", default="", help="global byte budgets, e.g. 0.28,0.4")
    parser.add_argument("--sparse", default="", help="sparse term share, e.g. 0.005")
    parser.add_argument("--no-baselines", action="store_true",
                        help="the source and the settings alone (the baselines of another run)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    calib, evaluation, sentences = split_text(assets.cache_dir() / "bench-text")
    out = args.out or HERE / "results" / f"sweep_{args.model}"
    common = ["--eps", args.eps, "--bits", args.bits, "--method", args.method,
              *(["--residual"] if args.residual else []), "--ratio", args.ratio,
              *(["--sparse", args.sparse] if args.sparse else []),
              *(["--no-baselines"] if args.no_baselines else []),
              "--calib", str(calib), "-o", str(out), "--overwrite"]
    if args.model == "smollm2":
        cmd = ["svdq", "sweep", str(assets.fetch("smollm2")), *common, "--ppl", str(evaluation),
               "--ctx", "1024", "--max-tokens", "16384"]
    else:
        cmd = ["svdq", "sweep", str(assets.fetch("minilm")), *common, "--calib-len", "128",
               "--similarity", str(sentences), "--batch-size", "32"]
    shown = " ".join(shlex.quote(c).replace(str(assets.cache_dir()), "$SVDQ_CACHE") for c in cmd)
    print(shown, flush=True)
    start = time.perf_counter()
    run = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if run.returncode != 0:
        sys.exit(run.returncode)
    wall = time.perf_counter() - start
    (out / "command.txt").write_text(
        f"python benchmarks/sweep.py {args.model} --eps {shlex.quote(args.eps)} --bits {args.bits} "
        f"--method {args.method}{' --residual' if args.residual else ''}"
        f"{' --ratio ' + args.ratio if args.ratio else ''}"
        f"{' --sparse ' + args.sparse if args.sparse else ''}"
        f"{' --no-baselines' if args.no_baselines else ''}"
        f"{' --out ' + str(args.out) if args.out else ''}\n# which ran:\n{shown}\n# wall time: {wall:.0f} s on "
        f"{os.cpu_count()} CPUs\n")
    results = json.loads((out / "results.json").read_text())
    (out / "summary.md").write_text(summary(results))
    print(summary(results))
    print(f"wall time {wall:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
