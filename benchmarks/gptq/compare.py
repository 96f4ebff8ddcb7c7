"""Benchmark: svdq's budgets against GPTQ as llm-compressor runs it, and against GPTQ plus an
EoRA-style low-rank correction of its error, at equal bytes, on one calibration and one
held-out evaluation text.

    python benchmarks/gptq/compare.py smollm2|gemma3|minilm --lc-python LC-VENV/bin/python
        [--settings 4:64,3:64,2:64] [--ranks 32,64] [--max-tokens 32768] [--work DIR]
        [--anchors-only]

MiniLM (an encoder) is scored by the cosine similarity of its sentence embeddings to the
source's on the held-out sentences, calibrated on 32 × 128 tokens; the language models by
perplexity. `--anchors-only` stops after the GPTQ and EoRA rows (svdq's rows are then single
`svdq compress --size` runs, as RESULTS.md records them).

1. The calibration ids svdq uses (32 × 512 tokens of the first 80% of the offline Wikipedia
   text, seed 0) are saved and handed to llm-compressor (`llmcompressor_run.py`, in its own
   virtual environment), which runs GPTQ at each bits:group setting whose group size divides
   every layer's input width (it refuses the others).
2. Each GPTQ model is evaluated as stored; its bytes are counted as svdq counts its own
   integer grid, the compressed-tensors layout: b-bit codes, a float16 scale and a b-bit zero
   point per group (4.3125 bits/weight at 4 bits in groups of 64).
3. GPTQ + correction: each layer's error W − Q is corrected by its rank-r whitened SVD on the
   layer's calibration inputs (the closed form EoRA computes through the eigendecomposition of
   XᵀX), the factors stored in float16 as EoRA stores them: 2·r·(out + in) more bytes.
4. `svdq sweep --ratio …` allocates svdq's budgets at exactly each of those byte counts, and
   evaluates them beside bitsandbytes' NF4 and 8-bit, all on the same text and windows
   (non-overlapping windows of 512 tokens).
Writes benchmarks/results/gptq_<model>.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))


def plain_folder(model: str):
    """(the model's file or folder, its plain safetensors folder, its svdq Source loaded
    whole)."""
    from svdq import assets
    from svdq.models import gguf, load

    path = assets.fetch(model)
    if path.is_dir():  # MiniLM: a plain folder already
        return path, path, load.load_source(str(path))
    streamed = load.load_source(str(path), stream=True)
    folder = gguf.cached(path, streamed.sha256)
    return path, folder, load.load_source(str(path))


def target_shapes(model) -> dict[str, tuple[int, int]]:
    from svdq.models.layers import targets, weight_of

    return {n: tuple(weight_of(model.get_submodule(n)).shape) for n in targets(model)}


def eora(model, lc_model, works: dict, rank: int) -> int:
    """Replace each target weight of `model` by llm-compressor's Q plus the rank-`rank` whitened
    correction of W − Q in float16; returns the correction's bytes."""
    from svdq.algo.factorize import factorize
    from svdq.models.layers import weight_of

    extra = 0
    for name, work in works.items():
        q = weight_of(lc_model.get_submodule(name)).float()
        f = factorize("whiten", work.w - q, work.stats)
        b = (f.u[:, :rank] * f.s[:rank]).half().float()  # B = U Σ (out × r), float16
        a = f.vt[:rank].half().float()  # A = Vᵀ S⁻¹ (r × in), float16
        model.get_submodule(name).weight.data.copy_(q + b @ a)
        extra += 2 * rank * sum(q.shape)
    return extra


def auto(args):
    """The transformers class that loads the model and llm-compressor's output of it."""
    import transformers

    return transformers.AutoModel if args.model == "minilm" else transformers.AutoModelForCausalLM


def anchor_rows(args, source, settings, ids, shapes, folder: Path, work: Path, ppl):
    """The source's perplexity, then per bits:group setting llm-compressor's GPTQ (run once,
    kept under `work`) and GPTQ + EoRA at each rank; and the byte counts svdq must meet."""

    from svdq.algo.quant import weight_bytes
    from svdq.pipeline.analyse import analyse
    from svdq.pipeline.work import Clock

    rows = [{"method": "source", "bytes": None, **ppl(source.model)}]
    print(rows[-1], flush=True)
    works = {w.name: w for w in analyse(source, settings, ids, lambda *a: None, Clock())}
    budgets = []
    for spec in args.settings.split(","):
        bits, group = map(int, spec.split(":"))
        if any(i % group for _, i in shapes.values()):
            rows.append({"method": f"GPTQ w{bits} g{group}", "note": "llm-compressor refuses: "
                         f"group {group} does not divide every layer's input width"})
            continue
        out = work / f"lc-w{bits}g{group}"
        if not (out / "run.json").is_file():
            subprocess.run([args.lc_python, str(HERE / "llmcompressor_run.py"), str(folder),
                            str(work / "ids.safetensors"), str(out), "--bits", str(bits),
                            "--group", str(group)], check=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        run = json.loads((out / "run.json").read_text())
        lc = auto(args).from_pretrained(out / "model", dtype=torch.float32).eval()
        size = sum(weight_bytes(o, i, bits, group, "int") for o, i in shapes.values())
        rows.append({"method": f"GPTQ w{bits} g{group} (llm-compressor)", "bytes": size,
                     "compress_s": run["oneshot_s"], **ppl(lc)})
        print(rows[-1], flush=True)
        budgets.append(size)
        for rank in map(int, args.ranks.split(",")):
            model = auto(args).from_pretrained(out / "model", dtype=torch.float32).eval()
            extra = eora(model, lc, works, rank)
            rows.append({"method": f"GPTQ w{bits} g{group} + EoRA r{rank}", "bytes": size + extra,
                         **ppl(model)})
            print(rows[-1], flush=True)
            budgets.append(size + extra)
    return rows, budgets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["smollm2", "gemma3", "minilm"])
    parser.add_argument("--lc-python", required=True)
    parser.add_argument("--settings", default="4:64,3:64,2:64,4:128,3:128")
    parser.add_argument("--ranks", default="32,64")
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--anchors-only", action="store_true",
                        help="stop after the GPTQ and GPTQ + EoRA rows (kept in WORK/anchors.json); "
                        "svdq's rows are then single compresses at those bytes")
    args = parser.parse_args()

    from safetensors.torch import save_file

    from svdq import assets
    from svdq.config import Settings
    from svdq.pipeline.inputs import calibration_ids
    from svdq.sweep import evaluator
    from sweep import split_text

    work = args.work or assets.cache_dir() / f"gptq-bench-{args.model}"
    work.mkdir(parents=True, exist_ok=True)
    calib, evaluation, sentences = split_text(assets.cache_dir() / "bench-text")
    path, folder, source = plain_folder(args.model)
    # compress's calibration defaults; MiniLM's sentences in 128 tokens, as benchmarks/sweep.py
    settings = Settings(calib=str(calib), budget_ratio=0.3,
                        calib_len=128 if args.model == "minilm" else 512)
    ids = calibration_ids(source, settings, lambda *a: None, {})
    save_file({"ids": ids.contiguous()}, str(work / "ids.safetensors"))
    shapes = target_shapes(source.model)
    fp16 = sum(2 * o * i for o, i in shapes.values())
    if args.model == "minilm":  # cosine similarity of sentence embeddings to the source's
        lines = [x for x in sentences.read_text().splitlines() if x.strip()]
        similarity, _ = evaluator(source, None, lines, None, None, args.max_tokens, 32)
        ppl = lambda m: {"similarity": similarity(m)["quality"]}  # noqa: E731
    else:
        perplexity, _ = evaluator(source, (evaluation.read_text(), str(evaluation)), None, 512,
                                  512, args.max_tokens, 1)
        ppl = lambda m: {"ppl": perplexity(m)["quality"]}  # noqa: E731
    # the anchors (GPTQ, GPTQ + EoRA) are kept: a rerun with the same arguments redoes svdq only
    anchors = work / "anchors.json"
    key = {"settings": args.settings, "ranks": args.ranks, "max_tokens": args.max_tokens}
    saved = json.loads(anchors.read_text()) if anchors.is_file() else {}
    if saved.get("key") == key:
        rows, budgets = saved["rows"], saved["budgets"]
    else:
        rows, budgets = anchor_rows(args, source, settings, ids, shapes, folder, work, ppl)
        anchors.write_text(json.dumps({"key": key, "rows": rows, "budgets": budgets}, indent=1))
    if args.anchors_only:
        print(json.dumps({"fp16_bytes": fp16, "rows": rows}, indent=1))
        return
    ratios = ",".join(f"{b / fp16:.8f}" for b in budgets)
    swept = work / "sweep"
    cmd = ["svdq", "sweep", str(path), "--eps", "", "--bits", "4,8", "--method", "whiten",
           "--ratio", ratios,
           "--calib", str(calib), "--ppl", str(evaluation), "--ctx", "512", "--stride", "512",
           "--max-tokens", str(args.max_tokens), "-o", str(swept), "--overwrite"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    sweep_s = time.perf_counter() - start
    results = json.loads((swept / "results.json").read_text())
    for r in results["rows"]:
        if r["method"] != "source":
            rows.append({"method": f"svdq {r['method']}" + (f" ≤ {r['ratio']:.4f}" if r["ratio"] else ""),
                         "bytes": r["target_bytes"], "ppl": r["quality"]})
    record = {"command": "python benchmarks/gptq/compare.py " + " ".join(sys.argv[1:]),
              "sweep_command": " ".join(cmd), "sweep_s": round(sweep_s), "fp16_bytes": fp16,
              "eval": {"text": str(evaluation), "ctx": 512, "max_tokens": args.max_tokens},
              "rows": rows}
    out_dir = HERE.parent / "results"
    (out_dir / f"gptq_{args.model}.json").write_text(json.dumps(record, indent=1))
    lines = [f"# {args.model}: svdq budgets against GPTQ (llm-compressor) and GPTQ + EoRA", "",
             f"Produced by `{record['command']}`; svdq's rows by `{record['sweep_command']}` "
             f"({record['sweep_s']} s for every row).", "",
             "| method | bits/weight | × fp16 | perplexity | compress s |", "|---|---|---|---|---|"]
    weights = fp16 / 2
    for r in rows:
        if r.get("bytes") is None:
            lines.append(f"| {r['method']} | - | - | {r.get('ppl', float('nan')):.3f} | "
                         f"{r.get('note', '')} |" if "ppl" in r else f"| {r['method']} | | | | {r['note']} |")
            continue
        lines.append(f"| {r['method']} | {8 * r['bytes'] / weights:.3f} | {r['bytes'] / fp16:.4f} | "
                     f"{r['ppl']:.3f} | {r.get('compress_s', '')} |")
    (out_dir / f"gptq_{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
