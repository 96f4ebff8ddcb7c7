"""Where a quantized model's loss comes from: an artifact's layers (dequantized) swapped into
the source one layer type at a time, then one block at a time, and the calibration loss on
the first sequences of the benchmark's calibration text measured each time (against the
source's, with every layer swapped in first).

    python benchmarks/gptq/damage.py ARTIFACT [--model gemma3] [--sequences 8]

Session 31: on Gemma-3-270M the GPTQ int4 g64 artifact's damage lies in the MLP layers, where
svdq's sensitivity estimate put 43% of it in the attention layers (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def setup(doc: str, sequences: int, more: dict[str, int] | None = None):
    """The command line (an artifact, --model, --sequences and the integer options `more`
    names, with their defaults) and the source model with the first calibration sequences,
    taken as `compress` takes them: (args, source, ids)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--model", choices=["smollm2", "gemma3"], default="gemma3")
    parser.add_argument("--sequences", type=int, default=sequences)
    for name, default in (more or {}).items():
        parser.add_argument(name, type=int, default=default)
    args = parser.parse_args()

    from compare import plain_folder
    from svdq import assets
    from svdq.calibration import text
    from sweep import split_text

    calib, _, _ = split_text(assets.cache_dir() / "bench-text")
    _, _, source = plain_folder(args.model)
    ids, _ = text.calibration_ids(None, source.tokenizer, str(calib), 32, 512, 8, 0, True,
                                  lambda *a: None, None)
    source.model.eval()
    return args, source, ids[:args.sequences]


def main() -> None:
    from svdq import load

    args, source, ids = setup(__doc__, 8)
    model = source.model
    stored = load(args.artifact, dequantize=True)
    new = {n: m.weight.data.float().clone() for n, m in stored.named_modules()
           if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"}
    del stored
    old = {n: model.get_submodule(n).weight.data.float().clone() for n in new}

    def loss(swap) -> float:
        for n in new:
            model.get_submodule(n).weight.data.copy_(new[n] if swap(n) else old[n])
        with torch.no_grad():
            return sum(float(model(input_ids=ids[k:k + 1], labels=ids[k:k + 1]).loss)
                       for k in range(ids.shape[0])) / ids.shape[0]

    base = loss(lambda n: False)
    print(f"source {base:.4f}\nall layers {loss(lambda n: True) - base:+.4f}", flush=True)
    for kind in sorted({n.rpartition(".")[2] for n in new}):
        print(f"{kind} {loss(lambda n: n.endswith('.' + kind)) - base:+.4f}", flush=True)
    blocks = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in new})
    for b in blocks:
        print(f"block {b} {loss(lambda n: f'.layers.{b}.' in n) - base:+.4f}", flush=True)


if __name__ == "__main__":
    main()
