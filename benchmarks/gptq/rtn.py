"""The round-to-nearest references of RESULTS.md "Against GPTQ": the source with every target
layer rounded to bitsandbytes' NF4 or blockwise 8-bit grid (blocks of 64, as
`bitsandbytes.nn.Linear4bit` stores NF4 by default), scored exactly as `score.py` scores an
artifact and `compare.py` the GPTQ anchors.

    python benchmarks/gptq/rtn.py minilm|smollm2|gemma3 --bits 4|8 [--max-tokens 16384]

Prints one JSON line: the target layers' bytes as stored on that grid (codes and float32
absmax per block, biases apart) and the score.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["smollm2", "gemma3", "minilm"])
    parser.add_argument("--bits", type=int, choices=[4, 8], required=True)
    parser.add_argument("--max-tokens", type=int, default=16384)
    args = parser.parse_args()

    from score import scorer
    from svdq.algo.quant import quantize, weight_bytes
    from svdq.models.layers import targets

    score, metric, source = scorer(args.model, args.max_tokens)  # before any layer is rounded
    model, stored = source.model, 0
    with torch.no_grad():
        for name in targets(model):
            layer = model.get_submodule(name)
            if type(layer) is not nn.Linear:
                sys.exit(f"{name} is a {type(layer).__name__}, not a Linear: not handled here")
            w = layer.weight.float()
            layer.weight.copy_(quantize(w, args.bits, 64, "bnb").dequantize().to(w.dtype))
            stored += weight_bytes(*w.shape, args.bits, 64, "bnb")
    label = "NF4" if args.bits == 4 else "8-bit"
    print(json.dumps({"model": args.model, "form": f"bitsandbytes {label}, blocks of 64",
                      "target_bytes": stored, metric: score(model)}))


if __name__ == "__main__":
    main()
