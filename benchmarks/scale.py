"""Benchmark: compress checkpoints block by block, and record wall time and peak memory.

    python benchmarks/scale.py [--models synthetic,smollm2,gemma3] [--knobs eps,ratio]
                               [--layers 22] [--calib-samples 16] [--cap-mb 2000]
                               [--modes stream,whole] [--out benchmarks/results] [--tag NAME]
                               [--device cuda] [--tokenizer DIR] [--calib FILE]

`synthetic`: a checkpoint of TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 32 heads,
4 key-value heads, vocab 49152 with SmolLM2's tokenizer, untied head) with random bf16 weights,
written once as sharded safetensors under the svdq cache folder without ever holding it
whole; `smollm2`, `gemma3`: the real offline GGUF assets. Each model is compressed with each
knob (`eps`: `--eps 0.1 --bits 4`; `ratio`: `--ratio 0.3`) as a child process per mode
(`stream`: the default, one block at a time; `whole`: `--no-stream`), and for the synthetic
checkpoint with `--cap-mb` once more per knob inside a cgroup memory limit smaller than the
checkpoint. Peak memory is the child's own max RSS (wait4); with `--device cuda` also the GPU
memory torch allocated at most (from the manifest). `--tokenizer` and `--calib` stand in for
the SmolLM2 tokenizer and the offline text on a machine without the assets. Random weights say nothing about
quality (their spectra are flat: most layers end dense): that checkpoint measures mechanics,
time and memory only. Writes `scale[_TAG].md` and `.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from svdq import assets

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=49152, max_position_embeddings=2048,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
CGROUP = Path("/sys/fs/cgroup/memory")


def synthetic(layers: int, tokenizer: Path | None = None) -> Path:
    """The checkpoint folder (made once): config, tokenizer, shards of at most 1 GB."""
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    folder = assets.cache_dir() / f"scale-llama-2048x{layers}"
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = transformers.LlamaConfig(**SHAPE, num_hidden_layers=layers, dtype="bfloat16",
                                      architectures=["LlamaForCausalLM"])
    with init_empty_weights():
        shapes = {k: t.shape for k, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    config.save_pretrained(tmp)
    if tokenizer is None:
        gguf = assets.fetch("smollm2")
        transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    else:
        transformers.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(tmp)
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        t = (torch.ones(shape) if key.endswith("norm.weight")
             else torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        current[key] = t
        size += t.numel() * 2
        if size >= 10 ** 9:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    tmp.rename(folder)
    return folder


KNOBS = {"eps": ["--eps", "0.1", "--bits", "4"], "ratio": ["--ratio", "0.3"]}


def source(name: str, layers: int, tokenizer: Path | None) -> tuple[Path, int]:
    """(what to compress, its bytes on disk)."""
    if name == "synthetic":
        folder = synthetic(layers, tokenizer)
        return folder, sum(p.stat().st_size for p in folder.glob("model-*.safetensors"))
    path = assets.fetch(name)
    return path, path.stat().st_size


def run(cmd: list[str], cap_mb: int | None = None) -> dict:
    """Run `cmd`; its wall time, its own peak RSS, and exit status (under a memory cap: in a
    cgroup v1 child group whose limit is `cap_mb`)."""
    group = None
    if cap_mb:
        group = CGROUP / f"svdq-scale-{os.getpid()}"
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(cap_mb * 2 ** 20))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():  # no swapping past the cap either
            swap.write_text(str(cap_mb * 2 ** 20))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            preexec_fn=(lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
                            if group else None)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    status = proc.returncode
    record = {"wall_s": round(wall, 1), "returncode": status}
    if group:
        record["cgroup_peak_mb"] = round(int((group / "memory.max_usage_in_bytes").read_text()) / 2 ** 20)
        record["cap_mb"] = cap_mb
        group.rmdir()
    record["stderr_tail"] = err.strip().splitlines()[-30:] if status else []
    record["stdout"] = out
    return record


def write(args, rows: list[dict]) -> str:
    """The results so far as scale[_TAG].json and .md (after each row: a run cut short keeps
    what it finished)."""
    tag = f"_{args.tag}" if args.tag else ""
    record = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
              + (f", {torch.cuda.get_device_name()}" if args.device != "cpu" else ""),
              "synthetic": {"layers": args.layers, **SHAPE, "dtype": "bfloat16"}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"scale{tag}.json").write_text(json.dumps(record, indent=1))
    lines = ["# svdq compress at scale: wall time and peak memory", "",
             f"Produced by `{record['command']}` on {record['machine']}.", "",
             f"`synthetic`: {args.layers} layers of TinyLlama-1.1B's shape (hidden 2048, "
             "intermediate 5632), random bf16 weights as safetensors shards; `smollm2`, "
             "`gemma3`: the offline GGUF files (streamed from a safetensors copy made once "
             f"under the svdq cache). Calibration: {args.calib_samples} × 512 tokens of the "
             "calibration part of the offline Wikipedia text.", "",
             "| model | source MB | mode | options | memory cap MB | wall s | peak RSS MB | "
             "cgroup peak MB | GPU peak MB | exit | artifact MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['source_bytes'] / 1e6:,.0f} | {r['mode']} | "
                     f"{r['options']} | {r.get('cap_mb') or '-'} | {r['wall_s']} | "
                     f"{r['peak_rss_mb'] or '-'} | {r.get('cgroup_peak_mb') or '-'} | "
                     f"{r.get('gpu_peak_mb') or '-'} | "
                     f"{r['returncode']} | {r['artifact_bytes'] / 1e6:,.0f} |")
    (args.out / f"scale{tag}.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="synthetic")
    parser.add_argument("--knobs", default="eps")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--modes", default="stream,whole")
    parser.add_argument("--cap-mb", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: SmolLM2's)")
    parser.add_argument("--calib", type=Path, help="calibration text (default: the offline wiki's)")
    args = parser.parse_args()

    sources = {name: source(name, args.layers, args.tokenizer)
               for name in args.models.split(",") if name}
    sys.path.insert(0, str(Path(__file__).parent))
    from sweep import split_text  # the calibration part of the offline text

    calib = args.calib or split_text(assets.cache_dir() / "bench-text")[0]
    work = Path(tempfile.mkdtemp(prefix="svdq-scale-"))
    work.chmod(0o755)
    rows = []
    for name, (path, size) in sources.items():
        for knob in args.knobs.split(","):
            plan = [(m, None) for m in args.modes.split(",") if m]
            if name == "synthetic" and args.cap_mb:
                plan.append(("stream", args.cap_mb))
            for mode, cap in plan:
                out = work / f"{name}-{knob}-{mode}-{cap or 'nocap'}"
                options = [*KNOBS[knob], "--calib-samples", str(args.calib_samples),
                           *(["--device", args.device] if args.device != "cpu" else [])]
                cmd = [sys.executable, str(Path(__file__).parent / "peak.py"), "svdq", "compress",
                       str(path), *options, "--calib", str(calib), "-o", str(out), "--json",
                       *([] if mode == "stream" else ["--no-stream"])]
                record = run(cmd, cap)
                stdout = record.pop("stdout").strip().splitlines()
                peak = json.loads(stdout[-1]) if record["returncode"] == 0 else {}
                done = json.loads(stdout[-2]) if record["returncode"] == 0 else {}
                gpu = done.get("device", {}).get("peak_allocated_mb")
                stages = done.get("timings_s")
                artifact = sum(p.stat().st_size for p in out.glob("*.safetensors")) if out.exists() else 0
                rows.append({"model": name, "source_bytes": size, "mode": mode,
                             "options": " ".join(options), **record,
                             "peak_rss_mb": peak.get("peak_rss_mb"), "gpu_peak_mb": gpu,
                             "stages_s": stages, "artifact_bytes": artifact})
                print(rows[-1], flush=True)
                write(args, rows)
                shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    print(write(args, rows))


if __name__ == "__main__":
    main()
