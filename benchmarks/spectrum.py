"""Benchmark: `svdq spectrum` on the offline models, its rank table as Markdown.

    python benchmarks/spectrum.py minilm|smollm2 [--samples 16] [--len 128]
                                  [--out benchmarks/results]

Runs `svdq spectrum` on the model with the bench text's calibration split, keeps
`spectrum_MODEL.png` and writes `spectrum_MODEL.md`: the command, the wall time and the table
of ranks for 90/95/99% explained variance (median over layers of each type; for the attention
heads over every head of every block). The per-layer spectra (`spectrum.json`) are left in a
temporary folder: they are megabytes and the command makes them again.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sweep import split_text  # noqa: E402

from svdq import assets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["minilm", "smollm2"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    calib = split_text(assets.cache_dir() / "bench-text")[0]
    work = Path(tempfile.mkdtemp(prefix="svdq-spectrum-"))
    cmd = ["svdq", "spectrum", str(assets.fetch(args.model)), "-o", str(work), "--calib",
           str(calib), "--calib-samples", str(args.samples), "--calib-len", str(args.len),
           "--json"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "spectrum.png", args.out / f"spectrum_{args.model}.png")
    lines = [f"`{shlex.join(['python', *sys.argv])}` ({seconds:.0f} s; runs `{shlex.join(cmd)}`)", "",
             "| layer type | spectrum | layers | full rank | 90% | 95% | 99% |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["table"]:
        lines.append(f"| {r['type']} | {r['spectrum']} | {r['count']} | {r['full_rank']} | "
                     f"{r['r90']} | {r['r95']} | {r['r99']} |")
    att = summary["attention"]
    if not att["applies"]:
        lines += ["", f"Attention product not computed: {att['why_not']}."]
    (args.out / f"spectrum_{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
