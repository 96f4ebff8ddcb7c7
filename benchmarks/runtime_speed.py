"""Benchmark: an artifact in memory — resident bytes, prefill and decode speed — kept as
stored, de-quantized, against its source in float32 and bfloat16 and against bitsandbytes'
own NF4 and int8 modules on the same layers.

    python benchmarks/runtime_speed.py ARTIFACT [--ctx 1024] [--new-tokens 128] [--repeats 3]
        [--variants stored,stored-no-int4,dequantized,source-fp32,source-bf16,bnb-nf4,bnb-int8]
        [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--out benchmarks/results] [--tag NAME]

Each variant runs in its own child process (so memory figures are its own): it loads the
model, returns freed memory to the system, and records the unique bytes of its parameters
and buffers and its resident set (VmRSS) after loading; then prefill tokens/s (one forward of
`--ctx` tokens, batch 1, no cache; the median of `--repeats` after one warm-up) and decode
tokens/s (greedy `generate` of exactly `--new-tokens` after a 16-token prompt, batch 1, with
the KV cache; the median of `--repeats`), and its peak RSS (VmHWM). The text is the wiki
asset's. `stored` is `svdq.load` (codes, scales and factors in memory, de-quantized a band of
rows per forward, or through a kernel that reads them: bitsandbytes' for NF4 and 8-bit codes,
torch's int4 CPU kernel for 4-bit integer codes in bfloat16), `stored-no-int4` the same
without torch's int4 kernel, `dequantized` is `svdq.load(dequantize=True)`, `source-*` is the source as
`svdq eval --baseline` loads it, `bnb-*` that source with every target layer of the artifact
replaced by `bitsandbytes.nn.Linear4bit` (NF4, blocks of 64, float32 compute) or
`Linear8bitLt` (int8 rows). `--dtype` runs the artifact's variants (`svdq.load(dtype=…)`) and
the bnb modules' compute in that dtype (the `source-*` variants keep theirs). `--device cuda`
runs every variant on the GPU (on a GPU `stored` uses bitsandbytes' kernels for the NF4 and
8-bit codes) and adds its allocated and peak GPU memory; times are synchronized. Writes
`runtime_speed[_TAG].md` and `.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("stored", "stored-no-int4", "dequantized", "source-fp32", "source-bf16", "bnb-nf4",
            "bnb-int8")


def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _storage_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        # an empty storage (svdq's weight markers) may carry the address of a real one
        if t.untyped_storage().nbytes() and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def _bnb(model, names: list[str], kind: str, dtype: torch.dtype, device: str):
    import bitsandbytes as bnb

    from svdq.models.layers import set_module

    for name in names:
        old = model.get_submodule(name)
        w = old.weight.detach().float()
        if type(old).__name__ == "Conv1D":
            w = w.T.contiguous()
        bias = old.bias is not None
        if kind == "nf4":
            new = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=bias, quant_type="nf4",
                                    compute_dtype=dtype)
            new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64)
        else:
            new = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=bias, has_fp16_weights=False)
            new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        if bias:
            new.bias = torch.nn.Parameter(old.bias.detach().to(dtype), requires_grad=False)
        set_module(model, name, new.to(device))  # on a GPU, .to() is where bnb quantizes
    return model


def load_variant(folder: Path, variant: str, device: str, dtype: torch.dtype):
    import svdq
    from svdq import artifact, evaluate as ev

    if variant == "stored-no-int4":  # as `stored`, torch's int4 CPU kernel left unused
        from svdq import runtime

        runtime._INT4[:] = [0]
        variant = "stored"
    if variant in ("stored", "dequantized"):
        return svdq.load(folder, device=device, dequantize=variant == "dequantized", dtype=dtype)
    manifest = artifact.read(folder)
    # through nn.Module: transformers refuses .float()/.to(dtype) on a model it de-quantized
    # from a GGUF file (it flags it as quantized)
    model = torch.nn.Module.float(ev.load_baseline(manifest).model).eval()
    if variant == "source-bf16":
        return torch.nn.Module.to(model, device=device, dtype=torch.bfloat16)
    if variant.startswith("bnb-"):
        model = torch.nn.Module.to(model, dtype)
        model = _bnb(model, [p["name"] for p in manifest["layers"] if p.get("lookup") is None],
                     variant.removeprefix("bnb-"),
                     dtype, device)
    return torch.nn.Module.to(model, device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def worker(args) -> None:
    import gc
    import ctypes

    import transformers

    from svdq import assets
    from svdq import evaluate as ev

    device, dtype = args.device, getattr(torch, args.dtype)
    model = load_variant(args.artifact, args.worker, device, dtype).eval()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    loaded = {"storage_bytes": _storage_bytes(model), "rss_after_load": _status("VmRSS")}
    if device == "cuda":
        loaded["gpu_allocated_after_load"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    tok = transformers.AutoTokenizer.from_pretrained(args.artifact)
    text = args.text.read_text() if args.text else assets.fetch("wiki").read_text()
    ids = ev.tokenize(tok, text, args.ctx)[None].to(device)
    timings = []
    with torch.no_grad():
        model(ids[:, :64], use_cache=False)  # warm-up
        for _ in range(args.repeats):
            _sync(device)
            t = time.perf_counter()
            model(ids, use_cache=False)
            _sync(device)
            timings.append(time.perf_counter() - t)
        prompt = ids[:, :16]
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        decode = []
        for _ in range(args.repeats):
            _sync(device)
            t = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False)
            _sync(device)
            decode.append(time.perf_counter() - t)
            assert out.shape[1] == 16 + args.new_tokens
    if device == "cuda":
        loaded["gpu_peak"] = torch.cuda.max_memory_allocated()
    print(json.dumps({**loaded, "prefill_tokens_per_s": ids.shape[1] / statistics.median(timings),
                      "decode_tokens_per_s": args.new_tokens / statistics.median(decode),
                      "peak_rss": _status("VmHWM"), "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--text", type=Path, default=None, help="text to tokenize (default: the wiki asset)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from svdq import artifact

    manifest = artifact.read(args.artifact)
    file_bytes = manifest["totals"]["artifact_tensor_bytes"]
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            sys.exit(f"unknown variant {variant!r}; use {', '.join(VARIANTS)}")
        cmd = [sys.executable, __file__, str(args.artifact), "--worker", variant, "--ctx",
               str(args.ctx), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
               "--device", args.device, "--dtype", args.dtype] + (["--text", str(args.text)] if args.text else [])
        run = subprocess.run(cmd, capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if run.returncode != 0:
            sys.exit(f"{variant} failed:\n{run.stderr[-3000:]}")
        rows.append({"variant": variant, **json.loads(run.stdout.strip().splitlines()[-1])})
        r = rows[-1]
        print(f"{variant}: {r['storage_bytes'] / 1e6:.1f} MB in tensors, prefill "
              f"{r['prefill_tokens_per_s']:.0f} tok/s, decode {r['decode_tokens_per_s']:.1f} tok/s",
              flush=True)
        table = write(args, manifest, file_bytes, rows)  # after every row: a failure keeps them
    print(table)


def write(args, manifest: dict, file_bytes: int, rows: list[dict]) -> str:
    """Write the rows so far as runtime_speed[_TAG].json and .md; returns the table."""
    command = "python benchmarks/runtime_speed.py " + shlex.join(sys.argv[1:])
    report = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}", "load_average": os.getloadavg()[0],
              "artifact_tensor_bytes": file_bytes, "source": manifest["source"]["id"],
              "ctx": args.ctx, "new_tokens": args.new_tokens, "device": args.device,
              "dtype": args.dtype, "rows": rows}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    name = "runtime_speed" + (f"_{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# An artifact in memory: {manifest['source']['id']}", "",
             f"Produced by `{command}` ({report['machine']}, {rows[0]['threads']} threads, "
             f"load average {report['load_average']:.2f} at the end).", "",
             f"Artifact tensors on disk: {file_bytes:,} bytes. Prefill: one forward of {args.ctx} "
             f"tokens; decode: {args.new_tokens} new tokens, greedy, KV cache, batch 1. "
             f"Device {args.device}{' (' + report['gpu'] + ')' if args.device == 'cuda' else ''}, "
             f"dtype {args.dtype}.", ""]
    gpu = args.device == "cuda"
    head = ["variant", "tensor bytes in memory", "× file", "RSS after load MB", "peak RSS MB",
            *(["GPU after load MB", "GPU peak MB"] if gpu else []), "prefill tok/s", "decode tok/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], f"{r['storage_bytes']:,}", f"{r['storage_bytes'] / file_bytes:.2f}",
                 f"{r['rss_after_load'] / 1e6:,.0f}", f"{r['peak_rss'] / 1e6:,.0f}",
                 *([f"{r['gpu_allocated_after_load'] / 1e6:,.0f}", f"{r['gpu_peak'] / 1e6:,.0f}"]
                   if gpu else []),
                 f"{r['prefill_tokens_per_s']:,.0f}", f"{r['decode_tokens_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
