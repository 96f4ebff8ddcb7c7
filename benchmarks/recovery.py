"""Benchmark: recovery fine-tuning and compression schedules at equal bytes.

    python benchmarks/recovery.py smollm2 --ratio 0.281 --steps 200
           [--schedules single,progressive,layerwise] [--stages 4] [--groups 3]
           [--no-plain] [--lr 1e-4] [--codes] [--out benchmarks/results] [--tag NAME]
           [--resume [--only VARIANT]]

For each schedule, `svdq compress` at `--ratio` without fine-tuning (unless `--no-plain`) and
with `--steps` fine-tuning steps in all, shared out over the schedule's stages (single: all
after its one compression; progressive: steps / stages after each; layerwise: steps / groups;
with `--codes` the codes train too, `compress --finetune-codes`), then `svdq eval` of each
artifact on held-out text: SmolLM2 perplexity on the bench text's eval split (ctx 1024, 16,384
tokens), MiniLM cosine similarity to the source on its sentences. Calibration and fine-tuning
text: the split's calib part. Every run is a child process; its wall time is recorded. Writes
`recovery_MODEL_rRATIO[_codes][_TAG].md` and `.json` after every row (a SmolLM2 table takes
hours); `--resume` keeps the rows of an earlier run of the same command (wherever its `--out`
was) and runs only the missing ones — with `--only "layerwise, 0 steps"` just that one, to
fit a row into the time at hand. Each artifact is removed once scored.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sweep import split_text  # noqa: E402

from svdq import assets  # noqa: E402


def run(cmd: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["smollm2", "minilm"])
    parser.add_argument("--ratio", type=float, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", default="1e-4")
    parser.add_argument("--schedules", default="single,progressive,layerwise")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--no-plain", action="store_true")
    parser.add_argument("--codes", action="store_true",
                        help="fine-tune the codes too (compress --finetune-codes)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows an earlier run of this command recorded")
    parser.add_argument("--only", help="run just this row (e.g. 'layerwise, 0 steps')")
    args = parser.parse_args()
    tag = (f"recovery_{args.model}_r{args.ratio}" + ("_codes" if args.codes else "")
           + (f"_{args.tag}" if args.tag else ""))  # (a codes table never overwrites a plain one)
    args.out.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[1:]  # --resume and --only say what runs now, not what the table is
    if "--only" in argv:
        k = argv.index("--only")
        argv = argv[:k] + argv[k + 2:]
    command = shlex.join(["python", "benchmarks/recovery.py",
                          *(a for a in argv if a != "--resume" and not a.startswith("--only="))])
    record = {"command": command, "machine": platform.platform(), "rows": []}
    if args.resume and (args.out / f"{tag}.json").exists():
        earlier = json.loads((args.out / f"{tag}.json").read_text())
        if _without_out(earlier["command"]) != _without_out(command):
            raise SystemExit(f"--resume: {tag}.json was made by `{earlier['command']}`, "
                             "not this command; run it without --resume or with its arguments")
        record["rows"] = earlier["rows"]
    done = {r["variant"] for r in record["rows"]}

    def save(row: dict) -> None:
        record["rows"].append(row)
        (args.out / f"{tag}.json").write_text(json.dumps(record, indent=1))
        (args.out / f"{tag}.md").write_text(render(record, args.model))

    calib, evaluation, sentences = split_text(assets.cache_dir() / "bench-text")
    model = str(assets.fetch(args.model))
    if args.model == "smollm2":
        score = ["--ppl", str(evaluation), "--ctx", "1024", "--max-tokens", "16384"]
    else:
        score = ["--similarity", str(sentences)]
    work = Path(tempfile.mkdtemp(prefix="svdq-recovery-"))
    if args.model == "smollm2" and "source" not in done:  # (an encoder's similarity is 1)
        base, seconds = run(["svdq", "eval", model, *score, "--json"])
        save({"variant": "source", "eval": base, "seconds": round(seconds, 1)})
    for sched in args.schedules.split(","):
        n = {"single": 1, "progressive": args.stages, "layerwise": args.groups}[sched]
        for steps in ([] if args.no_plain else [0]) + [args.steps]:
            variant = f"{sched}, {steps} steps"
            if variant in done or args.only not in (None, variant):
                continue
            out = work / f"{sched}-{steps}"
            cmd = ["svdq", "compress", model, "--ratio", str(args.ratio), "--calib", str(calib),
                   "-o", str(out), "--json", "--schedule", sched, "--stages", str(args.stages),
                   "--groups", str(args.groups), "--finetune-steps", str(steps // n),
                   "--finetune-lr", args.lr]
            cmd += ["--finetune-codes"] if args.codes and steps else []
            made, seconds = run(cmd)
            scored, _ = run(["svdq", "eval", str(out), *score, "--json"])
            shutil.rmtree(out)
            save({"variant": f"{sched}, {steps} steps", "command": shlex.join(cmd),
                  "seconds": round(seconds, 1), "bytes": made["totals"]["artifact_tensor_bytes"],
                  "ratio_fp16": made["totals"]["checkpoint_ratio_fp16"],
                  "target_ratio_fp16": made["totals"]["target_ratio_fp16"],
                  "schedule": made.get("schedule"), "eval": scored})
            print(json.dumps(scored), f"{sched}, {steps} steps", round(seconds, 1), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(render(record, args.model))


def _without_out(command: str) -> str:
    """A recorded command but for where it wrote (a resumed run may write elsewhere)."""
    words = shlex.split(command)
    for i, w in enumerate(words):
        if w == "--out" and i + 1 < len(words):
            del words[i: i + 2]
            break
    return shlex.join(words)


def _metric(row: dict, model: str) -> str:
    e = row["eval"]
    if model == "smollm2":
        return f"{e['ppl']['rows'][0]['ppl']:.3f}"
    return f"{e['similarity']['mean']:.4f}"


def render(record: dict, model: str) -> str:
    what = "perplexity" if model == "smollm2" else "similarity to the source"
    lines = [f"`{record['command']}`", "",
             f"| variant | stored bytes | target layers vs fp16 | {what} | wall s |",
             "|---|---|---|---|---|"]
    for r in record["rows"]:
        target = f"{r['target_ratio_fp16']:.3f}" if "target_ratio_fp16" in r else "-"
        size = f"{r['bytes']:,}" if "bytes" in r else "-"
        lines.append(f"| {r['variant']} | {size} | {target} | "
                     f"{_metric(r, model)} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
