"""Benchmark: the attention product against queries and keys compressed on their own (MiniLM).

    python benchmarks/attention_product.py [--eps 0.1,0.2,0.3,0.5] [--bits 8]
                                           [--out benchmarks/results]

Only the query and key layers are targets (`--include '*.attention.self.query' --include
'*.attention.self.key'`), so the bytes and the similarity measure them alone. Per eps, three
compressions of MiniLM with the bench text's calibration split: each layer on its own (the
eps-mode default, method svd), each layer on its own whitened (method whiten), and
`--attention-product` (the product where it stores fewer bytes than the svd forms). Each is
scored by `svdq eval --similarity` on the 1,000 bench sentences (cosine similarity of the
pooled embeddings to the source's). Writes attention_product_minilm.{json,md}: per row the
query + key bytes (the plan's), their ratio to fp16, the mean similarity, the layers the
product took and its rows per head.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from sweep import split_text  # noqa: E402

from svdq import assets  # noqa: E402

TARGETS = ["--include", "*.attention.self.query", "--include", "*.attention.self.key"]
VARIANTS = {"own (svd)": ["--method", "svd"], "own (whiten)": ["--method", "whiten"],
            "attention product": ["--attention-product"]}


def run(cmd: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    calib, _, sentences = split_text(assets.cache_dir() / "bench-text")
    model = str(assets.fetch("minilm"))
    work = Path(tempfile.mkdtemp(prefix="svdq-product-"))
    rows = []
    for eps in args.eps.split(","):
        for variant, flags in VARIANTS.items():
            out = work / f"{list(VARIANTS).index(variant)}-{eps}"
            cmd = ["svdq", "compress", model, "--eps", eps, "--bits", str(args.bits), *TARGETS,
                   *flags, "--calib", str(calib), "-o", str(out), "--json"]
            _, seconds = run(cmd)
            manifest = json.loads((out / "svdq.json").read_text())
            scored, _ = run(["svdq", "eval", str(out), "--similarity", str(sentences), "--json"])
            layers = manifest["layers"]
            product = [p for p in layers if p.get("rows")]
            rows.append({
                "eps": float(eps), "variant": variant, "command": shlex.join(cmd),
                "qk_bytes": sum(p["bytes"] for p in layers),
                "qk_fp16_bytes": sum(p["fp16_bytes"] for p in layers),
                "similarity": scored["similarity"]["mean"],
                "lowrank_layers": sum(p["kind"] == "lowrank" for p in layers),
                "product_layers": len(product),
                "product_rows": [sum(p["attention_product"]["heads"]) for p in product
                                 if p["name"].endswith("query")],
                "seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"command": shlex.join(sys.argv), "machine": platform.platform(), "rows": rows}
    (args.out / "attention_product_minilm.json").write_text(json.dumps(record, indent=1))
    (args.out / "attention_product_minilm.md").write_text(render(record))
    print(render(record))


def render(record: dict) -> str:
    lines = [f"`{record['command']}`", "",
             "| eps | variant | q + k bytes | × fp16 | similarity | low-rank layers | "
             "product layers (rows of the 384 per block) | compress s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        rows = ", ".join(map(str, r["product_rows"])) or "-"
        lines.append(f"| {r['eps']:g} | {r['variant']} | {r['qk_bytes']:,} | "
                     f"{r['qk_bytes'] / r['qk_fp16_bytes']:.3f} | {r['similarity']:.4f} | "
                     f"{r['lowrank_layers']} | {r['product_layers']} ({rows}) | {r['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
