"""Benchmark: svdq's GPTQ against llm-compressor's on the same Hessians and weights.

    python benchmarks/gptq/reference.py --lc-python /path/to/llmcompressor-venv/bin/python
        [--model smollm2] [--layers 2] [--settings 4:64,3:64]

Runs llm-compressor (`llmcompressor_run.py --record-hessians`) on the model's first
`--layers` blocks with svdq's calibration tokens, then svdq's `algo.gptq.gptq` with the same
settings (min-max scales: search off; static activation order; damping 0.01; lazy blocks of
128) on each recorded Hessian and original weight, and compares the layer losses
tr((W − Q) H (W − Q)ᵀ). Writes benchmarks/results/gptq_reference_MODEL.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lc-python", required=True)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--settings", default="4:64,3:64")
    args = parser.parse_args()

    from safetensors.torch import load_file, save_file

    from compare import plain_folder
    from svdq import assets
    from svdq.algo.gptq import gptq
    from svdq.config import Settings
    from svdq.pipeline.inputs import calibration_ids
    from sweep import split_text

    work = assets.cache_dir() / f"gptq-reference-{args.model}"
    work.mkdir(parents=True, exist_ok=True)
    calib = split_text(assets.cache_dir() / "bench-text")[0]
    _, folder, source = plain_folder(args.model)
    ids = calibration_ids(source, Settings(calib=str(calib), calib_samples=16), lambda *a: None, {})
    save_file({"ids": ids.contiguous()}, str(work / "ids.safetensors"))
    rows = []
    for spec in args.settings.split(","):
        bits, group = map(int, spec.split(":"))
        out = work / f"w{bits}g{group}"
        subprocess.run([args.lc_python, str(HERE / "llmcompressor_run.py"), str(folder),
                        str(work / "ids.safetensors"), str(out), "--bits", str(bits), "--group",
                        str(group), "--layers", str(args.layers), "--record-hessians"],
                       check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        recorded = load_file(str(out / "hessians.safetensors"))
        for name in sorted(k[: -len(".hessian")] for k in recorded if k.endswith(".hessian")):
            h = recorded[name + ".hessian"].double()
            w, theirs = recorded[name + ".weight_orig"], recorded[name + ".weight_gptq"]
            ours = gptq(w, h, bits, group, "int", search=False).dequantize()
            loss = lambda q: float(torch.sum(((w - q).double() @ h) * (w - q).double()))  # noqa: E731
            rows.append({"setting": f"w{bits} g{group}", "layer": name,
                         "llmcompressor": loss(theirs), "svdq": loss(ours)})
            rows[-1]["ratio"] = rows[-1]["svdq"] / rows[-1]["llmcompressor"]
    run = json.loads((out / "run.json").read_text())
    record = {"command": "python benchmarks/gptq/reference.py " + " ".join(sys.argv[1:]),
              "llmcompressor": run["versions"], "rows": rows}
    results = HERE.parent / "results"
    (results / f"gptq_reference_{args.model}.json").write_text(json.dumps(record, indent=1))
    ratios = [r["ratio"] for r in rows]
    lines = ["# svdq's GPTQ against llm-compressor's, on the same Hessians", "",
             f"Produced by `{record['command']}` (llm-compressor {run['versions']}). Layer "
             "loss tr((W − Q) H (W − Q)ᵀ) with the Hessian llm-compressor handed to its GPTQ.", "",
             f"svdq / llm-compressor over {len(rows)} layers: min {min(ratios):.4f}, max "
             f"{max(ratios):.4f}.", "",
             "| setting | layer | llm-compressor | svdq | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['layer']} | {r['llmcompressor']:.5g} | {r['svdq']:.5g} | "
              f"{r['ratio']:.4f} |" for r in rows]
    (results / f"gptq_reference_{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:6]))


if __name__ == "__main__":
    main()
