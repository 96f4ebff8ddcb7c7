"""Screen `--fast`'s knobs one at a time: SmolLM2 (or Gemma-3-270M) compressed at GPTQ w4
g64's bytes (or w3 g64's) with one of `pipeline.fast`'s settings changed, each run's stages
and judged losses, then every artifact's perplexity on the held-out text as `speed.py` scores
it (Gemma: the first 16,384 tokens, as its speed runs).

    python benchmarks/gptq/knobs.py base,rounds1,gradient8,bases3 [--model gemma3] [--bits 4]
        [--work DIR]

A knob is set in the compress process before the CLI runs (the code as checked out is the
baseline, `base`); runs go one at a time. No llm-compressor here: `speed.py` times GPTQ
beside svdq; this only compares svdq's settings with each other.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

FAST = "import svdq.pipeline.fast as f; import svdq.pipeline.options as o; "
EVEN = ("import svdq.pipeline.budget as b; _c = b.candidates; _bits = __import__('os').environ"
        "['KNOB_BITS']; _e = lambda m, n, k: b.even(m.options, n, int(_bits), k); ")
KNOBS = {  # name: what it sets, against the checked-out code
    "base": "",
    # the default budget (not --fast): the gradient pass on every sequence, the full options
    "default": "import sys; sys.argv.remove('--fast')",
    "noprobe": "import svdq.pipeline.probe as p; p.PROBE = 0",  # sensitivity × error² alone
    # the gradient pass on every calibration sequence, with the statistics weighing each token
    # by its own ‖g‖² (`probe.WEIGHED`), or without (the probe as in --fast)
    "allgrad": FAST + "f.GRADIENT_SHARE = 1; import svdq.pipeline.probe as p; p.WEIGHED = True",
    "allgradplain": FAST + "f.GRADIENT_SHARE = 1; import svdq.pipeline.probe as p; "
                    "p.WEIGHED = False",
    "rounds1": FAST + "f.ROUNDS = 1",  # one round of the alternation
    "rounds0": FAST + "f.ROUNDS = 0",
    "gradient8": FAST + "f.GRADIENT_SHARE = 8; f.GRADIENT_LEAST = 4",  # an eighth, at least 4
    "gradient16": FAST + "f.GRADIENT_SHARE = 16; f.GRADIENT_LEAST = 2",
    "gradient4": FAST + "f.GRADIENT_SHARE = 4; f.GRADIENT_LEAST = 2",  # a quarter: 8 of 32
    "gradient1": FAST + "f.GRADIENT_SHARE = 32; f.GRADIENT_LEAST = 1",  # one sequence of 32
    # the judge's and the gradient pass's head in float32 even where bfloat16 is native
    "fp32head": "import svdq.pipeline.two_pass as t, svdq.pipeline.walk as w; "
                "t.native_bf16 = w.native_bf16 = lambda device: False",
    "bases2": FAST + "f.BASES = o.FAST_BASES = 2",
    "bases3": FAST + "f.BASES = o.FAST_BASES = 3",
    # EoRA's recipe (`budget.even`: one base everywhere, corrections of one rank) among the
    # candidates, or as the only plan (nothing judged: its own perplexity)
    "even": EVEN + "b.candidates = lambda m, n, k, few=False: _c(m, n, k, few) + _e(m, n, k)",
    # the sensitivities from the text's next tokens (the empirical Fisher, until session 31)
    # or from labels the model draws itself (the Fisher, since)
    "textlabels": "import svdq.pipeline.probe as p; p.SAMPLED = False",
    "sampled": "import svdq.pipeline.probe as p; p.SAMPLED = True",
    # a diagnostic, not a method: the attention projections' sensitivities × 0.1, as
    # damage.py measures them on Gemma's GPTQ int4 (nothing), the MLP's as they are
    "attention01": "import svdq.pipeline.measured as m; _r = m.raw_sensitivity; "
                   "m.raw_sensitivity = lambda w: (_r(w) or 0) * (0.1 if w.name.endswith(("
                   "'q_proj', 'k_proj', 'v_proj', 'o_proj')) else 1.0)",
    "evenonly": EVEN + "b.candidates = lambda m, n, k, few=False: _e(m, n, k) or _c(m, n, k, few)",
}
# GPTQ w4 g64's and w3 g64's bytes, as speed.py counts them
BYTES = {"smollm2": {4: 57231360, 3: 43752960}, "gemma3": {4: 54051840, 3: 41322240}}
TOKENS = {"smollm2": 32768, "gemma3": 16384}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("knobs", help=f"comma-separated, of: {', '.join(KNOBS)}")
    parser.add_argument("--model", choices=sorted(BYTES), default="smollm2")
    parser.add_argument("--bits", type=int, choices=[3, 4], default=4)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    names = args.knobs.split(",")
    unknown = [n for n in names if n not in KNOBS]
    if unknown:
        sys.exit(f"unknown knob {unknown[0]!r}; choose from {', '.join(KNOBS)}")

    from compare import plain_folder
    from svdq import assets, load
    from svdq.sweep import evaluator
    from sweep import split_text

    work = args.work or assets.cache_dir() / f"gptq-knobs-{args.model}"
    work.mkdir(parents=True, exist_ok=True)
    calib, evaluation, _ = split_text(assets.cache_dir() / "bench-text")
    _, folder, source = plain_folder(args.model)
    size = BYTES[args.model][args.bits]
    rows = []
    for name in names:
        out = work / f"{name}-w{args.bits}"
        code = KNOBS[name] + "\nimport sys\nfrom svdq.cli import app\nsys.argv[0] = 'svdq'\napp()"
        with open(work / f"{name}-w{args.bits}.log", "w") as log:
            subprocess.run([sys.executable, "-c", code, "compress", str(folder), "--size",
                            f"{size}B", "--calib", str(calib), "-o", str(out),
                            "--overwrite", "--json", "--fast"], check=True,
                           stdout=subprocess.DEVNULL, stderr=log,
                           env={**os.environ, "HF_HUB_OFFLINE": "1",
                                "KNOB_BITS": str(args.bits)})
        manifest = json.loads((out / "svdq.json").read_text())
        budget = manifest["budget"]
        rows.append({"knob": name, "stages_s": manifest["timings_s"], "bases": budget.get("fast", {}).get("bases"),
                     "candidates": [(c["plan"], c["calibration_loss"]) for c in budget["candidates"]]})
        print(json.dumps(rows[-1]), flush=True)
    score, _ = evaluator(source, (evaluation.read_text(), str(evaluation)), None, 512, 512,
                         args.max_tokens or TOKENS[args.model], 1)
    for row in rows:
        row["ppl"] = score(load(work / f"{row['knob']}-w{args.bits}", dequantize=True))["quality"]
        print(json.dumps({"knob": row["knob"], "ppl": row["ppl"]}), flush=True)
    (work / f"knobs-w{args.bits}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
