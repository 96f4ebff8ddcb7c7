"""Time and quality of svdq's budget against llm-compressor's GPTQ at GPTQ's bytes, in one run,
one job at a time on the same machine (issue 10's speed goal: a budget compress no slower than
the GPTQ run it is compared with).

    python benchmarks/gptq/speed.py smollm2 --lc-python /tmp/lc/bin/python \
        --settings 4:64,3:64 --svdq=--fast --svdq= [--work DIR]

Per bits:group setting, in this order: llm-compressor's GPTQ (`llmcompressor_run.py`, its own
venv), then `svdq compress MODEL --size <GPTQ's bytes>B --calib calib.txt EXTRA` once per
`--svdq` (EXTRA: more flags, e.g. --fast; "" the default budget). Each command runs under
`/usr/bin/time -v` (wall, user and system seconds, peak RSS) with nothing else of this script
running, both reading the same checkpoint folder (the GGUF asset's float weights, which
`compare.plain_folder` writes once; until session 27 svdq read the .gguf itself, 5.6 s more);
then every result is scored on the held-out text as `compare.py` scores its anchors
(windows of 512, the first --max-tokens tokens). Rows go to stdout and WORK/speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def timed(cmd: list[str], log: Path) -> dict:
    """Run `cmd` under /usr/bin/time -v; its wall, user, system seconds and peak RSS."""
    with open(log, "w") as f:
        subprocess.run(["/usr/bin/time", "-v", *cmd], check=True, stdout=f, stderr=subprocess.STDOUT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    text = log.read_text()

    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.+)", text).group(1).strip()
    clock = [float(x) for x in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
    return {"wall_s": round(sum(x * 60 ** i for i, x in enumerate(reversed(clock))), 1),
            "user_s": float(field("User time (seconds)")),
            "system_s": float(field("System time (seconds)")),
            "peak_rss_mb": round(int(field("Maximum resident set size (kbytes)")) / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["smollm2", "gemma3"])
    parser.add_argument("--lc-python", required=True)
    parser.add_argument("--settings", default="4:64")
    parser.add_argument("--svdq", action="append", default=None,
                        help="extra flags of one svdq run (repeatable; \"\": the default budget)")
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    runs = args.svdq if args.svdq is not None else ["--fast"]

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from compare import plain_folder, target_shapes
    from svdq import assets, load
    from svdq.algo.quant import weight_bytes
    from svdq.config import Settings
    from svdq.pipeline.inputs import calibration_ids
    from svdq.sweep import evaluator
    from sweep import split_text

    work = args.work or assets.cache_dir() / f"gptq-speed-{args.model}"
    work.mkdir(parents=True, exist_ok=True)
    calib, evaluation, _ = split_text(assets.cache_dir() / "bench-text")
    _, folder, source = plain_folder(args.model)
    ids = calibration_ids(source, Settings(calib=str(calib), budget_ratio=0.3), lambda *a: None, {})
    save_file({"ids": ids.contiguous()}, str(work / "ids.safetensors"))
    shapes = target_shapes(source.model)
    done = []  # (row, how to load its model) — scored after every timed run
    for spec in args.settings.split(","):
        bits, group = map(int, spec.split(":"))
        size = sum(weight_bytes(o, i, bits, group, "int") for o, i in shapes.values())
        out = work / f"lc-w{bits}g{group}"
        row = {"method": f"GPTQ w{bits} g{group} (llm-compressor)", "bytes": size,
               **timed([args.lc_python, str(HERE / "llmcompressor_run.py"), str(folder),
                        str(work / "ids.safetensors"), str(out), "--bits", str(bits),
                        "--group", str(group)], work / f"lc-w{bits}g{group}.log")}
        row["oneshot_s"] = json.loads((out / "run.json").read_text())["oneshot_s"]
        print(json.dumps(row), flush=True)
        done.append((row, lambda out=out: AutoModelForCausalLM.from_pretrained(
            out / "model", dtype=torch.float32).eval()))
        for k, extra in enumerate(runs):
            art = work / f"svdq-w{bits}g{group}-{k}"
            cmd = [sys.executable, "-m", "svdq", "compress", str(folder), "--size", f"{size}B",
                   "--calib", str(calib), "-o", str(art), "--overwrite", "--json", *extra.split()]
            row = {"method": f"svdq --size {size}B {extra}".strip(),
                   **timed(cmd, work / f"svdq-w{bits}g{group}-{k}.log")}
            manifest = json.loads((art / "svdq.json").read_text())
            row["bytes"] = manifest["totals"]["target_bytes"]
            row["stages_s"] = manifest.get("timings_s") or manifest.get("timings")
            budget = manifest.get("budget") or {}
            row["plan"] = budget.get("plan")
            row["candidates"] = [(c["plan"], c["calibration_loss"]) for c in budget["candidates"]]
            print(json.dumps(row), flush=True)
            done.append((row, lambda art=art: load(art, dequantize=True)))
    score, _ = evaluator(source, (evaluation.read_text(), str(evaluation)), None, 512, 512,
                         args.max_tokens, 1)
    rows = [{"method": "source", "ppl": score(source.model)["quality"]}]
    for row, model in done:
        rows.append({**row, "ppl": score(model())["quality"]})
        print(json.dumps({"method": row["method"], "ppl": rows[-1]["ppl"]}), flush=True)
    (work / "speed.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
