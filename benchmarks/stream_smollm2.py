"""Benchmark: the streamed pipeline on a real model gives the artifact the whole-model one does.

    python benchmarks/stream_smollm2.py [--eps 0.05] [--bits 8] [--out benchmarks/results]

Converts the offline SmolLM2-135M GGUF asset once into a safetensors folder (float32, as the
GGUF loads) under the svdq cache folder, then runs `svdq compress` on the GGUF file (loaded
whole: GGUF sources do not stream) and on the folder (streamed block by block), each as a
child process with its own peak RSS, and compares the two artifacts tensor for tensor and
plan for plan; it also compares the plan with the one recorded in
`benchmarks/results/compress_smollm2.json` (same settings, before the statistics were
accumulated in column slices). Writes `stream_smollm2.md` and `.json`.
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

import torch

from svdq import assets, runtime


def converted(gguf: Path) -> Path:
    import transformers

    folder = assets.cache_dir() / "smollm2-safetensors"
    if (folder / "config.json").is_file():
        return folder
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a GGUF quantization config
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    tmp = folder.with_name(folder.name + ".partial")
    plain.save_pretrained(tmp)
    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def compress(model: Path, out: Path, options: list[str], wiki: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).parent / "peak.py"), "svdq", "compress", str(model),
           *options, "--calib", str(wiki), "-o", str(out), "--json"]
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if run.returncode != 0:
        sys.exit(f"svdq compress failed:\n{run.stderr}")
    return {"wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_mb": json.loads(run.stdout.strip().splitlines()[-1])["peak_rss_mb"]}


def tensors(folder: Path) -> dict:
    return runtime.load_tensors(folder, runtime.read_manifest(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", default="0.05")
    parser.add_argument("--bits", default="8")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    gguf, wiki = assets.fetch("smollm2"), assets.fetch("wiki")
    folder = converted(gguf)
    options = ["--eps", args.eps, "--bits", args.bits]
    work = Path(tempfile.mkdtemp(prefix="svdq-stream-"))
    whole, streamed = work / "whole", work / "streamed"
    runs = {"whole (GGUF)": compress(gguf, whole, options, wiki),
            "streamed (safetensors)": compress(folder, streamed, options, wiki)}
    ta, tb = tensors(whole), tensors(streamed)
    same = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    plan = lambda f: [(p["name"], p["kind"], p["rank"], p["bits"], p["bytes"])  # noqa: E731
                      for p in json.loads((f / runtime.MANIFEST).read_text())["layers"]]
    recorded_path = Path(__file__).parent / "results" / "compress_smollm2.json"
    recorded = [(p["name"], p["kind"], p["rank"], p["bits"], p["bytes"])
                for p in json.loads(recorded_path.read_text())["layers"]]
    differ = [a for a, b in zip(plan(streamed), recorded) if a != b]
    plans_same = plan(whole) == plan(streamed)
    shutil.rmtree(work)
    record = {"command": "python benchmarks/stream_smollm2.py " + " ".join(sys.argv[1:]),
              "options": options, "runs": runs, "tensors_identical": same,
              "plans_identical": plans_same,
              "layers_differing_from_recorded": len(differ), "differing": differ[:10]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stream_smollm2.json").write_text(json.dumps(record, indent=1))
    lines = ["# Streamed against whole-model compress on SmolLM2-135M", "",
             f"Produced by `{record['command']}`: `svdq compress {' '.join(options)}` with the "
             "offline Wikipedia text, 32 × 512 calibration tokens.", "",
             "| source | wall s | peak RSS MB |", "|---|---|---|"]
    lines += [f"| {k} | {v['wall_s']} | {v['peak_rss_mb']} |" for k, v in runs.items()]
    lines += ["", f"- tensors identical: **{same}**; plans identical: **{plans_same}**",
              f"- layers whose (kind, rank, bits, bytes) differ from the plan recorded in "
              f"`results/compress_smollm2.json`: **{len(differ)} of {len(recorded)}**"]
    (args.out / "stream_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
