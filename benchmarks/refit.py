"""Benchmark: what `--sequential` and `--refit` buy on SmolLM2-135M, each alone and together.

    python benchmarks/refit.py [--eps 0.1] [--bits 8] [--method svd] [--residual]

For one eps/bits/method, runs `svdq compress` four times on the offline SmolLM2 asset (plain,
--refit, --sequential, --sequential --refit; calibration on the calibration part of the text,
as benchmarks/sweep.py splits it), then `svdq eval` on each artifact (perplexity, ctx 1024,
the first 16,384 tokens of the evaluation part). Writes results/refit_<method>_eps<eps>_bits<bits>.md
and .json with the commands, wall times, stored bytes and perplexities.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from svdq import assets

HERE = Path(__file__).parent
VARIANTS = {"plain": [], "refit": ["--refit"], "sequential": ["--sequential"],
            "sequential + refit": ["--sequential", "--refit"]}


def run(cmd: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return done.stdout, time.perf_counter() - start


def rms(errors: list) -> float | None:
    """Root mean square of per-layer errors; None where the manifest has none (no --refit)."""
    if None in errors:
        return None
    return (sum(e * e for e in errors) / len(errors)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", default="0.1")
    parser.add_argument("--bits", default="8")
    parser.add_argument("--method", default="svd")
    parser.add_argument("--residual", action="store_true", help="compress with --residual")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    from sweep import split_text

    calib, evaluation, _ = split_text(assets.cache_dir() / "bench-text")
    gguf = assets.fetch("smollm2")
    work = Path(tempfile.mkdtemp(prefix="svdq-refit-"))
    rows = []
    try:
        for name, flags in VARIANTS.items():
            out = work / name.replace(" + ", "_")
            options = ["--eps", args.eps, "--bits", args.bits, "--method", args.method,
                       *(["--residual"] if args.residual else []), *flags]
            compressed, compress_s = run(["svdq", "compress", str(gguf), *options, "--calib",
                                          str(calib), "-o", str(out), "--json"])
            manifest = json.loads((out / "svdq.json").read_text())
            measured, eval_s = run(["svdq", "eval", str(out), "--ppl", str(evaluation), "--ctx",
                                    "1024", "--max-tokens", "16384", "--json"])
            ppl = json.loads(measured)["ppl"]["rows"][0]["ppl"]
            t, layers = manifest["totals"], manifest["layers"]
            refit = [p for p in layers if p.get("refit")]
            before = [p.get("source_error_before_refit") for p in layers]
            after = [p.get("source_error") for p in layers]
            rows.append({"variant": name, "options": " ".join(options),
                         "target_ratio_fp16": t["target_ratio_fp16"],
                         "lowrank_layers": t["lowrank_layers"],
                         "residual_layers": t.get("residual_layers", 0), "refit_layers": len(refit),
                         "source_error_rms": rms(after), "before_refit_rms": rms(before),
                         "ppl": ppl, "compress_s": round(compress_s, 1),
                         "eval_s": round(eval_s, 1), "timings_s": manifest["timings_s"]})
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work)

    tag = f"refit_{args.method}{'_residual' if args.residual else ''}_eps{args.eps}_bits{args.bits}"
    (HERE / "results" / f"{tag}.json").write_text(json.dumps(rows, indent=1))
    lines = [f"# --sequential and --refit on SmolLM2-135M ({args.method}, "
             f"{'--residual, ' if args.residual else ''}eps {args.eps}, {args.bits} bits)", "",
             f"Produced by `python benchmarks/refit.py --eps {args.eps} --bits {args.bits} "
             f"--method {args.method}{' --residual' if args.residual else ''}`: `svdq compress <smollm2.gguf> OPTIONS --calib <calib.txt>`,"
             " then `svdq eval <out> --ppl <eval.txt> --ctx 1024 --max-tokens 16384`, on "
             f"{os.cpu_count()} CPUs.", "",
             "Error against the source: each layer's output error relative to the source "
             "layer on the source model's inputs, root mean square over the layers, before → "
             "after the refit (recorded with --refit only).", "",
             "| variant | options | bytes vs fp16 | low-rank layers | corrected layers | refitted "
             "| error against the source | perplexity | compress s | eval s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = ("-" if r["source_error_rms"] is None
               else f"{r['before_refit_rms']:.4f} → {r['source_error_rms']:.4f}")
        lines.append(f"| {r['variant']} | `{r['options']}` | {r['target_ratio_fp16']:.3f} | "
                     f"{r['lowrank_layers']} | {r['residual_layers']} | {r['refit_layers']} | "
                     f"{err} | {r['ppl']:.2f} | "
                     f"{r['compress_s']} | {r['eval_s']} |")
    (HERE / "results" / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
