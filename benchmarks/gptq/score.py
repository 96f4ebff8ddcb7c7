"""Score one svdq artifact exactly as `compare.py` scores the GPTQ anchors: MiniLM by the mean
cosine similarity of its sentence embeddings to the source's on the 1,000 held-out sentences
(batch 32), a language model by perplexity on the held-out text in non-overlapping windows
of 512 (the first --max-tokens tokens).

    python benchmarks/gptq/score.py ARTIFACT minilm|smollm2|gemma3 [--max-tokens 16384]

Prints one JSON line: the artifact's stored target bytes, its score and the settings it was
compressed with (the rows of RESULTS.md "Against GPTQ").
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def scorer(model: str, max_tokens: int):
    """(score, metric name, the source) for `model`, as the anchors are scored: `score(m)` is
    m's similarity (MiniLM) or perplexity on the held-out part of the bench text."""
    from compare import plain_folder
    from svdq import assets
    from svdq.sweep import evaluator
    from sweep import split_text

    _, evaluation, sentences = split_text(assets.cache_dir() / "bench-text")
    _, _, source = plain_folder(model)
    if model == "minilm":
        lines = [x for x in sentences.read_text().splitlines() if x.strip()]
        score, _ = evaluator(source, None, lines, None, None, max_tokens, 32)
        return (lambda m: score(m)["quality"]), "similarity", source
    score, _ = evaluator(source, (evaluation.read_text(), str(evaluation)), None, 512, 512,
                         max_tokens, 1)
    return (lambda m: score(m)["quality"]), "ppl", source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("model", choices=["smollm2", "gemma3", "minilm"])
    parser.add_argument("--max-tokens", type=int, default=16384)
    args = parser.parse_args()

    import svdq

    score, metric, _ = scorer(args.model, args.max_tokens)
    model = svdq.load(args.artifact, dequantize=True)
    manifest = json.loads((args.artifact / "svdq.json").read_text())
    budget = manifest.get("budget") or {}
    print(json.dumps({"artifact": str(args.artifact), metric: score(model),
                      "target_bytes": manifest["totals"]["target_bytes"],
                      "plan": budget.get("plan"),
                      "candidates": budget.get("candidates"),
                      "settings": {k: v for k, v in manifest["settings"]["_data"].items()
                                   if k in ("sequential", "refit", "budget_bytes", "calib_len",
                                            "calib_samples")},
                      "timings_s": manifest.get("timings_s")}))


if __name__ == "__main__":
    main()
