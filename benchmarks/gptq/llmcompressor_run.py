"""Run llm-compressor's own GPTQ on a model and save what it produced. Runs in a virtual
environment with llm-compressor installed (its pins are not svdq's; see gptq/README.md):

    VENV/bin/python benchmarks/gptq/llmcompressor_run.py MODEL_DIR IDS.safetensors OUT_DIR \
        --bits 4 --group 64 [--layers 2] [--record-hessians]

MODEL_DIR: a plain Hugging Face folder (safetensors, tokenizer). IDS.safetensors: key "ids",
the calibration token ids (samples × length) svdq uses, so both tools see the same tokens.
Scheme: integer, asymmetric, group strategy, act-order "static" (llm-compressor's "weight":
columns by descending Hessian diagonal, groups kept in the original layout), dampening 0.01,
block 128, its default min-max observer; every Linear but lm_head (and an encoder's pooler,
which sentence embeddings do not use and svdq does not target); the sequential pipeline.
MODEL_DIR may hold a causal LM or an encoder (BERT: AutoModel, its layers as the blocks).

OUT_DIR gets `model/` — the model with each quantized Linear's weight replaced by what GPTQ
stored, de-quantized (a plain folder any tool loads, for evaluation) — and `run.json` (wall
time of oneshot, versions, the settings). With --record-hessians, `hessians.safetensors`
holds per Linear the Hessian llm-compressor handed to GPTQ and the original weight (for a
layer-by-layer comparison with svdq's GPTQ on the same inputs). `--layers N` keeps the first
N decoder blocks only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def keep_layers(model, n: int) -> None:
    """The first `n` decoder blocks only (and the config to match: Gemma 3's per-layer
    attention types too, which its config checks on saving)."""
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("ids", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--record-hessians", action="store_true")
    args = parser.parse_args()

    import compressed_tensors
    import llmcompressor
    import llmcompressor.modifiers.gptq.base as gptq_base
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    config = transformers.AutoConfig.from_pretrained(args.model)
    causal = any("CausalLM" in a for a in config.architectures or [])
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel  # encoders
    model = auto.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    if args.layers:
        keep_layers(model, args.layers)
    names = {m: n for n, m in model.named_modules()}
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head" and "pooler" not in n}
    hessians = {}
    if args.record_hessians:  # what GPTQ is handed, recorded without changing it
        real = gptq_base.prepare_batch

        def prepare_batch(batch, *rest):
            out = real(batch, *rest)
            for module, h in zip(batch, out[1]):
                hessians[names[module]] = h.detach().clone().cpu()
            return out
        gptq_base.prepare_batch = prepare_batch
    ids = load_file(str(args.ids))["ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=False, strategy="group",
                               group_size=args.group)
    recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head", "re:.*pooler.*"], actorder="static",
                          dampening_frac=0.01, block_size=128)
    # the blocks GPTQ walks one at a time: a causal LM's decoder layers (found by
    # llm-compressor itself), an encoder's layers (BERT's, named here)
    blocks = None if causal else [type(model.encoder.layer[0]).__name__]
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe,
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
            shuffle_calibration_samples=False, pipeline="sequential", sequential_targets=blocks)
    wall = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    # a plain model: each quantized weight as stored, de-quantized; nothing else changed
    plain = auto.from_pretrained(args.model, dtype=torch.float32)
    if args.layers:
        keep_layers(plain, args.layers)
    state = plain.state_dict()
    for name in originals:
        state[name + ".weight"] = model.get_submodule(name).weight.detach().float().clone()
    plain.load_state_dict(state)
    shutil.rmtree(args.out / "model", ignore_errors=True)
    plain.save_pretrained(args.out / "model")
    tokenizer.save_pretrained(args.out / "model")
    if hessians:
        save_file({**{f"{n}.hessian": h.contiguous() for n, h in hessians.items()},
                   **{f"{n}.weight_orig": w.contiguous() for n, w in originals.items()},
                   **{f"{n}.weight_gptq": state[n + ".weight"].contiguous() for n in originals}},
                  str(args.out / "hessians.safetensors"))
    (args.out / "run.json").write_text(json.dumps({
        "oneshot_s": round(wall, 1), "bits": args.bits, "group": args.group,
        "scheme": "int asymmetric, group strategy, actorder static, dampening 0.01, block 128",
        "samples": list(ids.shape), "layers": args.layers or model.config.num_hidden_layers,
        "versions": {"llmcompressor": llmcompressor.__version__,
                     "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__}},
        indent=1))


if __name__ == "__main__":
    main()
