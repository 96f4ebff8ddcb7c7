"""Benchmark: compress a checkpoint of TinyLlama-1.1B's shape block by block, and record wall
time and peak memory.

    python benchmarks/scale.py [--layers 22] [--calib-samples 16] [--cap-mb 2000]
                               [--modes stream,whole] [--out benchmarks/results]

Writes, once, a synthetic Llama checkpoint (hidden 2048, intermediate 5632, 32 heads, 4
key-value heads, vocab 49152 with SmolLM2's tokenizer, untied head) with random bf16 weights
as sharded safetensors under the svdq cache folder, without ever holding it whole. Then runs
`svdq compress --eps 0.1 --bits 4` on it as a child process per mode (`stream`: the default,
one block at a time; `whole`: `--no-stream`), and with `--cap-mb` once more inside a cgroup
memory limit smaller than the checkpoint. Peak memory is the child's own max RSS (wait4).
Random weights say nothing about quality (their spectra are flat: most layers end dense): this
measures mechanics, time and memory only. Writes `scale.md` and `scale.json`.
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


def synthetic(layers: int) -> Path:
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
    gguf = assets.fetch("smollm2")
    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
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
    record["stderr_tail"] = err.strip().splitlines()[-1:] if status else []
    record["stdout"] = out
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--modes", default="stream,whole")
    parser.add_argument("--cap-mb", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    folder = synthetic(args.layers)
    ckpt = sum(p.stat().st_size for p in folder.glob("model-*.safetensors"))
    wiki = assets.fetch("wiki")
    work = Path(tempfile.mkdtemp(prefix="svdq-scale-"))
    work.chmod(0o755)
    rows = []
    plan = [(m, None) for m in args.modes.split(",") if m] + ([("stream", args.cap_mb)] if args.cap_mb else [])
    for mode, cap in plan:
        out = work / f"{mode}-{cap or 'nocap'}"
        options = ["--eps", "0.1", "--bits", "4", "--calib-samples", str(args.calib_samples)]
        cmd = [sys.executable, str(Path(__file__).parent / "peak.py"), "svdq", "compress",
               str(folder), *options, "--calib", str(wiki), "-o", str(out), "--json",
               *([] if mode == "stream" else ["--no-stream"])]
        record = run(cmd, cap)
        peak = json.loads(record.pop("stdout").strip().splitlines()[-1]) if record["returncode"] == 0 else {}
        artifact = sum(p.stat().st_size for p in out.glob("*.safetensors")) if out.exists() else 0
        rows.append({"mode": mode, "options": " ".join(options), **record,
                     "peak_rss_mb": peak.get("peak_rss_mb"), "artifact_bytes": artifact})
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    record = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
              "checkpoint": {"layers": args.layers, **SHAPE, "bytes": ckpt, "dtype": "bfloat16"},
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(record, indent=1))
    lines = ["# svdq compress at scale: a TinyLlama-1.1B-shaped checkpoint (random bf16 weights)", "",
             f"Produced by `{record['command']}` on {record['machine']}.", "",
             f"Checkpoint: {args.layers} layers, hidden 2048, intermediate 5632, "
             f"{ckpt / 1e9:.2f} GB of bf16 safetensors shards. Calibration: {args.calib_samples} × "
             "512 tokens of the offline Wikipedia text.", "",
             "| mode | options | memory cap | wall s | peak RSS MB | cgroup peak MB | exit | artifact MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['options']} | {r.get('cap_mb') or '-'} | {r['wall_s']} | "
                     f"{r['peak_rss_mb'] or '-'} | {r.get('cgroup_peak_mb') or '-'} | "
                     f"{r['returncode']} | {r['artifact_bytes'] / 1e6:,.0f} |")
    (args.out / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
