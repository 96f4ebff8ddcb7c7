"""Benchmark: forward speed of an svdq artifact against its uncompressed source on this CPU.

    python benchmarks/eval_speed.py [ARTIFACT] [--ctx 1024] [--max-windows 8] [--repeats 5]

The requirement: the artifact's tokens/s must be at least 0.9× its source's on the same CPU.
Without ARTIFACT the offline SmolLM2-135M asset is compressed first, into a temporary folder:

    svdq compress $(svdq assets smollm2) --calib $(svdq assets wiki) --eps 0.05 --bits 8 -o TMP

(`--eps`, `--bits` change that run). The artifact is loaded with `svdq.load`, its source with
`svdq.evaluate.load_baseline(manifest)` (in the dtype the artifact holds). Both score the same
`--max-windows` windows of `--ctx` tokens (stride = ctx, batch 1) cut from the last 20% of the
wiki asset (from an article boundary, as benchmarks/sweep.py cuts its evaluation text), through
`svdq.evaluate.perplexity`. After one untimed warm-up window each, the two are timed in
alternation, `--repeats` rounds, the order swapped every round (A B, B A, A B, …) so that a
change of machine load over time hits both alike. Reported: the median tokens/s of each, their
ratio, the per-round ratios, and both perplexities (identical every round: the models are
deterministic). Run it on a quiet machine; the load average before and after is recorded.
Writes `eval_speed.md` into `--out` (default benchmarks/results) and prints it.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
REQUIRED = 0.9  # the artifact's tokens/s must be at least this fraction of the source's


def _svdq_command() -> list[str]:
    script = Path(sys.executable).with_name("svdq")
    if script.exists():
        return [str(script)]
    found = shutil.which("svdq")
    if not found:
        sys.exit("the svdq console script is not installed (pip install -e .)")
    return [found]


def _shown(parts: list[str]) -> str:
    """A command line with the asset cache written as $SVDQ_CACHE."""
    from svdq import assets

    return shlex.join(parts).replace(str(assets.cache_dir()), "$SVDQ_CACHE")


def compress_default(folder: Path, eps: str, bits: str) -> tuple[Path, str, float]:
    from svdq import assets

    out = folder / "smollm2"
    cmd = ["compress", str(assets.fetch("smollm2")), "--calib", str(assets.fetch("wiki")),
           "--eps", eps, "--bits", bits, "-o", str(out)]
    shown = _shown(["svdq", *cmd]).replace(str(out), "TMP")
    print(f"compressing: {shown}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    run = subprocess.run(_svdq_command() + cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"svdq compress failed:\n{run.stderr}")
    return out, shown, time.perf_counter() - start


def eval_text(path: Path) -> str:
    """The last 20% of the text, from the first article boundary after 80%."""
    text = path.read_text(encoding="utf-8")
    cut = text.find("\n\n", int(0.8 * len(text)))
    return text[cut if cut >= 0 else int(0.8 * len(text)):].lstrip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", nargs="?", type=Path,
                        help="svdq artifact folder (default: compress the SmolLM2 asset)")
    parser.add_argument("--eps", default=None, help="for the default compression (0.05)")
    parser.add_argument("--bits", default=None, help="for the default compression (8)")
    parser.add_argument("--ctx", type=int, default=1024, help="tokens per window")
    parser.add_argument("--max-windows", type=int, default=8, help="windows per timed pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of each model")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own, here %d)" % torch.get_num_threads())
    parser.add_argument("--text", type=Path, default=None,
                        help="text whose last 20%% is scored (default: the wiki asset)")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="folder for eval_speed.md")
    args = parser.parse_args(argv)
    if args.artifact is not None and (args.eps or args.bits):
        parser.error("--eps/--bits only apply when no artifact is given (they pick the default "
                     "compression)")
    if args.max_windows < 1 or args.repeats < 1 or args.ctx < 2:
        parser.error("--max-windows and --repeats must be ≥ 1, --ctx ≥ 2")
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import svdq
    from svdq import artifact, assets
    from svdq import evaluate as ev
    from svdq.errors import SvdqError

    command = _shown(["python", "benchmarks/eval_speed.py", *(sys.argv[1:] if argv is None else argv)])
    tmp = None
    compressed = None
    if args.artifact is None:
        tmp = Path(tempfile.mkdtemp(prefix="svdq-speed-"))
        folder, compress_cmd, compress_s = compress_default(tmp, args.eps or "0.05", args.bits or "8")
        compressed = (compress_cmd, compress_s)
    else:
        folder = args.artifact
    try:
        manifest = artifact.read(folder)
        model_a = svdq.load(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        base = ev.load_baseline(manifest)
        model_b = base.model
        for note in base.notes:
            print(f"warning: {note}", file=sys.stderr)
        text_path = args.text or assets.fetch("wiki")
        need = args.ctx * args.max_windows
        ids = ev.tokenize(tokenizer, eval_text(text_path), need)
        if ids.numel() < need:
            sys.exit(f"the text gives {ids.numel()} tokens, {need} are needed for "
                     f"{args.max_windows} windows of {args.ctx}; lower --max-windows or --ctx")
        models = {"artifact": model_a, "source": model_b}
        load_before = os.getloadavg()
        for m in models.values():  # warm-up: allocations, first-call dispatch
            ev.perplexity(m, ids[: args.ctx], args.ctx, args.ctx)
        speed: dict[str, list[float]] = {name: [] for name in models}
        ppl: dict[str, set[float]] = {name: set() for name in models}
        rounds = []
        for rep in range(args.repeats):
            order = list(models) if rep % 2 == 0 else list(reversed(models))
            got = {}
            for name in order:
                r = ev.perplexity(models[name], ids, args.ctx, args.ctx, batch_size=1)
                assert r["windows"] == args.max_windows
                got[name] = r["tokens_per_s"]
                speed[name].append(r["tokens_per_s"])
                ppl[name].add(r["ppl"])
            rounds.append((" ".join(order), got["artifact"], got["source"]))
            print(f"round {rep + 1}/{args.repeats}: artifact {got['artifact']:,.0f} tok/s, "
                  f"source {got['source']:,.0f} tok/s", file=sys.stderr, flush=True)
        load_after = os.getloadavg()
    except SvdqError as e:
        sys.exit(f"error: {e}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    med = {name: statistics.median(v) for name, v in speed.items()}
    ratio = med["artifact"] / med["source"]
    per_round = [a / s for _, a, s in rounds]
    t = manifest["totals"]
    verdict = "meets" if ratio >= REQUIRED else "MISSES"
    lines = [
        "# Forward speed: svdq artifact vs its source", "",
        "Produced by:", "", f"    {command}", "",
    ]
    if compressed:
        lines += [f"which first compressed ({compressed[1]:.0f} s):", "", f"    {compressed[0]}", ""]
    lines += [
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after",
        f"- artifact: {'TMP (SmolLM2-135M)' if compressed else _shown([str(folder)])}, source "
        f"{_shown([manifest['source']['id']])}, dtype {manifest.get('dtype')}; "
        f"{t['lowrank_layers']}/{t['layers']} target layers low-rank, target layers "
        f"{t['target_ratio_fp16']:.3f} × fp16 (eps {manifest['settings']['_data']['eps']}, "
        f"bits {manifest['settings']['_data']['bits']})",
        f"- text: the last 20% of {_shown([str(text_path)])}, {ids.numel():,} tokens = "
        f"{args.max_windows} windows of {args.ctx} (stride {args.ctx}, batch 1); "
        "`svdq.evaluate.perplexity`, one untimed warm-up window each, then "
        f"{args.repeats} timed rounds alternating A B / B A",
        "",
        "| model | median tokens/s | min | max | perplexity |",
        "|---|---|---|---|---|",
    ]
    for name in models:
        p = sorted(ppl[name])
        shown_ppl = f"{p[0]:.4f}" if len(p) == 1 else f"{p[0]:.4f}…{p[-1]:.4f} (varied!)"
        lines.append(f"| {name} | {med[name]:,.0f} | {min(speed[name]):,.0f} | "
                     f"{max(speed[name]):,.0f} | {shown_ppl} |")
    lines += [
        "",
        f"**artifact / source = {ratio:.3f}** (median tokens/s; required ≥ {REQUIRED}: "
        f"{verdict}); per-round ratios " + ", ".join(f"{x:.3f}" for x in per_round)
        + f" (median {statistics.median(per_round):.3f})",
    ]
    if compressed:
        lines += ["", "The default compression calibrates on the whole wiki asset, which contains "
                  "the scored text: the perplexities are not held-out figures; the speeds are "
                  "the measurement."]
    report = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval_speed.md").write_text(report)
    print(report)
    print(f"wrote {args.out / 'eval_speed.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
