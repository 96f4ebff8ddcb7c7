"""Benchmark: the attention product against queries and keys compressed on their own.

    python benchmarks/attention_product.py minilm|vit [--eps 0.1,0.2,0.3,0.5] [--bits 8]
                                      [--variants "own (svd),own (whiten),attention product"]
                                      [--out benchmarks/results]

Only the query and key layers are targets (`--include` of their names), so the bytes and the
score measure them alone. Per eps, three compressions: each layer on its own (the eps-mode
default, method svd), each layer on its own whitened (method whiten), and
`--attention-product` (the product where it stores fewer bytes than the svd forms). MiniLM
calibrates on the bench text's calibration split and is scored by `svdq eval --similarity` on
the 1,000 bench sentences (cosine similarity of the pooled embeddings to the source's); the
ViT trained by `benchmarks/vision.py` (run that first) calibrates on its 512 images and is
scored by `svdq eval --accuracy` on the 10,000 Fashion-MNIST test images. Writes
attention_product_MODEL.{json,md}: per row the query + key bytes (the plan's), their ratio to
fp16, the score, the layers the product took and its rows per block.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from recovery import run  # noqa: E402  (a child command's JSON and its seconds)
from sweep import split_text  # noqa: E402

from svdq import assets  # noqa: E402

TARGETS = {"minilm": ["--include", "*.attention.self.query", "--include", "*.attention.self.key"],
           "vit": ["--include", "*.attention.q_proj", "--include", "*.attention.k_proj"]}
VARIANTS = {"own (svd)": ["--method", "svd"], "own (whiten)": ["--method", "whiten"],
            "attention product": ["--attention-product"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=list(TARGETS))
    parser.add_argument("--eps", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="a comma list of: " + ", ".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--append", action="store_true", help="add the rows to the table there")
    args = parser.parse_args()
    if args.model == "minilm":
        calib, _, sentences = split_text(assets.cache_dir() / "bench-text")
        model, score = str(assets.fetch("minilm")), ["--similarity", str(sentences)]
    else:
        vision = assets.cache_dir() / "vision"
        if not (vision / "vit" / "model.safetensors").is_file():
            raise SystemExit("no trained ViT: run `python benchmarks/vision.py vit` first")
        calib, model = vision / "calib", str(vision / "vit")
        score = ["--accuracy", str(vision / "test")]
    work = Path(tempfile.mkdtemp(prefix="svdq-product-"))
    rows = []
    for eps in args.eps.split(","):
        for variant in args.variants.split(","):
            flags = VARIANTS[variant]
            out = work / f"{list(VARIANTS).index(variant)}-{eps}"
            cmd = ["svdq", "compress", model, "--eps", eps, "--bits", str(args.bits),
                   *TARGETS[args.model], *flags, "--calib", str(calib), "-o", str(out), "--json"]
            if args.model == "vit":
                cmd += ["--calib-samples", "256"]
            _, seconds = run(cmd)
            manifest = json.loads((out / "svdq.json").read_text())
            scored, _ = run(["svdq", "eval", str(out), *score, "--json"])
            layers = manifest["layers"]
            product = [p for p in layers if p.get("rows")]
            rows.append({
                "eps": float(eps), "variant": variant, "command": shlex.join(cmd),
                "qk_bytes": sum(p["bytes"] for p in layers),
                "qk_fp16_bytes": sum(p["fp16_bytes"] for p in layers),
                "score": _score(scored),
                "lowrank_layers": sum(p["kind"] == "lowrank" for p in layers),
                "product_layers": len(product),
                "product_rows": [sum(p["attention_product"]["heads"]) for p in product
                                 if p["name"] == p["attention_product"]["pair"][0]],
                "seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"commands": [shlex.join(sys.argv)], "machine": platform.platform(), "rows": rows}
    path = args.out / f"attention_product_{args.model}.json"
    if args.append and path.is_file():  # more rows for the same table
        before = json.loads(path.read_text())
        record["commands"] = before["commands"] + record["commands"]
        record["rows"] = before["rows"] + rows
    path.write_text(json.dumps(record, indent=1))
    (args.out / f"attention_product_{args.model}.md").write_text(render(record, args.model))
    print(render(record, args.model))


def _score(scored: dict) -> float:
    if scored.get("similarity"):
        return scored["similarity"]["mean"]
    return scored["accuracy"]["rows"][0]["top1"]


def render(record: dict, model: str) -> str:
    what = "similarity" if model == "minilm" else "top-1"
    lines = [*(f"`{c}`  " for c in record["commands"]), "",
             f"| eps | variant | q + k bytes | × fp16 | {what} | low-rank layers | "
             "product layers (rows kept per block) | compress s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        rows = ", ".join(map(str, r["product_rows"])) or "-"
        lines.append(f"| {r['eps']:g} | {r['variant']} | {r['qk_bytes']:,} | "
                     f"{r['qk_bytes'] / r['qk_fp16_bytes']:.3f} | {r['score']:.4f} | "
                     f"{r['lowrank_layers']} | {r['product_layers']} ({rows}) | {r['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
