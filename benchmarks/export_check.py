"""Benchmark: `svdq export` on a real artifact — the exported models' perplexity against the
artifact's own, on the same tokens and windows, and the bytes of each.

    python benchmarks/export_check.py ARTIFACT --text eval.txt [--ctx 512] [--max-tokens 32768]
                                      [--out benchmarks/results] [--tag NAME] [--threads N]

Exports ARTIFACT with `--to hf` in float32 and in the default dtype, and with `--to peft` in
the default dtype, into a temporary folder; then scores the artifact (`svdq.load`, layers as
stored), each `hf` folder (transformers alone) and the `peft` base with its adapter
(`PeftModel`) through `svdq.evaluate.perplexity` (stride = ctx, batch 1). float32 `hf` must
match the artifact to rounding; the 16-bit exports differ by the rounding of every weight to
that dtype. Writes `export_check[_TAG].md` and `.json` into `--out`.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from peft import PeftModel

    import svdq
    from svdq import artifact, evaluate as ev
    from svdq.artifact.export import export

    manifest = artifact.read(args.artifact)
    auto = (transformers.AutoModelForCausalLM if manifest["architecture"].endswith("ForCausalLM")
            else transformers.AutoModel)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.artifact)
    ids = ev.tokenize(tokenizer, args.text.read_text(), args.max_tokens)
    rows = []

    def score(name: str, model, bytes_: int, export_s: float | None, record: dict | None) -> None:
        t = time.perf_counter()
        result = ev.perplexity(model.eval(), ids, args.ctx, args.ctx, 1)
        rows.append({"model": name, "ppl": result["ppl"], "tensor_bytes": bytes_,
                     "export_s": export_s, "eval_s": round(time.perf_counter() - t, 1),
                     "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                     **({"record": record} if record else {})})
        print(f"{name}: ppl {result['ppl']:.4f}", flush=True)

    score("artifact (svdq.load)", svdq.load(args.artifact),
          manifest["totals"]["artifact_tensor_bytes"], None, None)
    with tempfile.TemporaryDirectory() as tmp:
        for to, dtype in (("hf", "float32"), ("hf", "auto"), ("peft", "auto")):
            folder = Path(tmp) / f"{to}-{dtype}"
            t = time.perf_counter()
            record = export(args.artifact, to, folder, dtype)
            took = round(time.perf_counter() - t, 1)
            model = auto.from_pretrained(folder)
            if to == "peft":
                model = PeftModel.from_pretrained(model, str(folder / "adapter"))
            score(f"export --to {to} --dtype {dtype}", model,
                  record["base_tensor_bytes"] + record["adapter_tensor_bytes"], took, record)
            del model
    command = "python benchmarks/" + Path(__file__).name + " " + shlex.join(sys.argv[1:])
    report = {"command": command, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "artifact": str(args.artifact), "source": manifest["source"]["id"],
              "tokens": int(ids.numel()), "ctx": args.ctx, "rows": rows}
    name = "export_check" + (f"_{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# svdq export on {manifest['source']['id']}", "",
             f"Produced by `{command}` ({report['machine']}, torch {torch.__version__}).", "",
             f"{report['tokens']:,} tokens of `{args.text.name}`, windows of {args.ctx}, stride {args.ctx}.", "",
             "| model | dtype | perplexity | tensor bytes | export s | eval s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['ppl']:.4f} | {r['tensor_bytes']:,} | "
                     f"{r['export_s'] if r['export_s'] is not None else '-'} | {r['eval_s']} |")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
