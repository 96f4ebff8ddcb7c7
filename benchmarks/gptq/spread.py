"""How far a model's perplexity moves between equally good GPTQ solutions: svdq's GPTQ
(integer grid, min-max scales, static act-order, as llm-compressor runs it) calibrated block
by block as llm-compressor's sequential pipeline does — each block's Grams from what the
already quantized blocks before it produce, the block itself unquantized while they are
gathered — at several dampening fractions, each scored on the held-out text as `speed.py`
scores its rows; with `--lc-model`, llm-compressor's own result beside them.

    python benchmarks/gptq/spread.py gemma3 [--damps 0.009,0.01,0.011] [--bits 4 --group 64]
        [--tokens 16384,65536] [--lc-model LC_OUT/model]

In memory (no artifact): the same GPTQ svdq's budgets run (`algo.gptq.gptq`, search off),
which `reference.py` checks against llm-compressor's on its recorded Hessians.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


class _Stop(Exception):
    """Raised after the block being calibrated: nothing past it needs to run."""


def _halt(*_) -> None:
    raise _Stop


def quantize_sequentially(model, ids: torch.Tensor, bits: int, group: int, damp: float,
                          batch: int = 8) -> None:
    """Every Linear of every decoder block replaced by svdq's GPTQ of it, block by block."""
    from svdq.algo.gptq import gptq

    for block in model.model.layers:
        lins = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
                 for n, m in lins.items()}

        def add(name: str, x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).double()
            grams[name].add_(x.T @ x)
        hooks = [m.register_forward_pre_hook(lambda _, a, n=n: add(n, a[0])) for n, m in lins.items()]
        hooks.append(block.register_forward_hook(_halt))
        for i in range(0, len(ids), batch):
            try:
                model.model(input_ids=ids[i:i + batch])
            except _Stop:
                pass
        for h in hooks:
            h.remove()
        for n, m in lins.items():
            m.weight.copy_(gptq(m.weight.float(), grams[n], bits, group, "int", damp=damp,
                                search=False).dequantize().to(m.weight.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["smollm2", "gemma3"])
    parser.add_argument("--damps", default="0.009,0.01,0.011")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--tokens", default="16384")
    parser.add_argument("--lc-model", type=Path, default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    from transformers import AutoModelForCausalLM

    from compare import plain_folder
    from svdq import assets
    from svdq.config import Settings
    from svdq.pipeline.inputs import calibration_ids
    from svdq.sweep import evaluator
    from sweep import split_text

    calib, evaluation, _ = split_text(assets.cache_dir() / "bench-text")
    _, _, source = plain_folder(args.model)
    ids = calibration_ids(source, Settings(calib=str(calib), budget_ratio=0.3), lambda *a: None, {})
    scores = {t: evaluator(source, (evaluation.read_text(), str(evaluation)), None, 512, 512, t, 1)[0]
              for t in map(int, args.tokens.split(","))}
    model = source.model
    original = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("model.layers.")}
    rows = [{"run": "source", **{f"ppl_{t}": s(model)["quality"] for t, s in scores.items()}}]
    print(json.dumps(rows[-1]), flush=True)
    if args.lc_model:
        lc = AutoModelForCausalLM.from_pretrained(args.lc_model, dtype=torch.float32).eval()
        rows.append({"run": f"llm-compressor GPTQ w{args.bits} g{args.group}",
                     **{f"ppl_{t}": s(lc)["quality"] for t, s in scores.items()}})
        print(json.dumps(rows[-1]), flush=True)
        del lc
    for damp in map(float, args.damps.split(",")):
        model.load_state_dict(original, strict=False)
        quantize_sequentially(model, ids, args.bits, args.group, damp)
        rows.append({"run": f"svdq GPTQ w{args.bits} g{args.group}, sequential, damp {damp:g}",
                     **{f"ppl_{t}": s(model)["quality"] for t, s in scores.items()}})
        print(json.dumps(rows[-1]), flush=True)
    out = HERE.parent / "results" / "gptq_spread"
    out.mkdir(exist_ok=True)
    name = f"{args.model}_w{args.bits}g{args.group}.json"
    (out / name).write_text(json.dumps({"command": "python benchmarks/gptq/spread.py "
                                        + " ".join(sys.argv[1:]), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
