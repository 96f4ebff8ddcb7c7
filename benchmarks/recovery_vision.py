"""Benchmark: `svdq finetune` on image classifiers — top-1 before and after distillation.

    python benchmarks/recovery_vision.py resnet|vit [--case "--eps 0.2 --bits 4" ...]
           [--steps 200] [--lr 1e-4] [--train-images 4096] [--out benchmarks/results]

The model trained by `benchmarks/vision.py` (trained once, cached) is compressed by each
`--case` on its 512 calibration images, evaluated on the 10,000 Fashion-MNIST test images
(`svdq eval --accuracy`), fine-tuned by `svdq finetune` on `--train-images` other training
images (a tenth of them held out for the validation KL; labels unused: the source is the
teacher), and evaluated again. Same bytes before and after (checked). Writes
`recovery_vision_MODEL.md` and `.json`.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import vision  # noqa: E402  (the trained models and the image folders)

CASES = {"resnet": ["--eps 0.2 --bits 4 --method whiten", "--ratio 0.06"],
         "vit": ["--eps 0.2 --bits 4 --method whiten", "--ratio 0.08"]}


def train_folder(n: int) -> Path:
    """`n` training images (none of the 512 calibration ones) as PNGs, made once."""
    from PIL import Image

    folder = vision.CACHE / f"finetune-train-{n}"
    if folder.is_dir():
        return folder
    images = vision.read_idx("train-images-idx3-ubyte")
    calib = set(np.random.default_rng(0).choice(len(images), 512, replace=False).tolist())
    rest = [i for i in range(len(images)) if i not in calib]
    pick = np.random.default_rng(1).choice(rest, n, replace=False)
    tmp = Path(tempfile.mkdtemp(dir=vision.CACHE))
    for i in sorted(pick):
        Image.fromarray(images[i], "L").save(tmp / f"{i:05d}.png")
    tmp.rename(folder)
    return folder


def svdq(*args: str) -> dict:
    done = subprocess.run(["svdq", *args, "--json"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"svdq {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def top1(folder: Path, test: Path) -> float:
    return svdq("eval", str(folder), "--accuracy", str(test), "--batch-size", "256")["accuracy"]["rows"][0]["top1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=["resnet", "vit"])
    ap.add_argument("--case", action="append", help="compress options (default: two per model)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-images", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    source = vision.train(args.model, vision.EPOCHS[args.model])
    test, calib = vision.write_images()
    images = train_folder(args.train_images)
    work = Path(tempfile.mkdtemp(prefix="svdq-recovery-vision-"))
    rows = []
    try:
        base = top1(source, test)
        for case in args.case or CASES[args.model]:
            out, tuned = work / "out", work / "tuned"
            start = time.perf_counter()
            made = svdq("compress", str(source), *case.split(), "--calib", str(calib),
                        "--calib-samples", "512", "-o", str(out), "--overwrite")
            compress_s = time.perf_counter() - start
            before = top1(out, test)
            start = time.perf_counter()
            rec = svdq("finetune", str(out), "-o", str(tuned), "--calib", str(images),
                       "--steps", str(args.steps), "--lr", str(args.lr), "--batch-size",
                       str(args.batch_size), "--samples", str(args.train_images),
                       "--val-samples", "64", "--overwrite")
            finetune_s = time.perf_counter() - start
            after = top1(tuned, test)
            same = (json.loads((tuned / "svdq.json").read_text())["totals"]
                    == json.loads((out / "svdq.json").read_text())["totals"])
            rows.append({"case": case, "target_ratio_fp16": made["totals"]["target_ratio_fp16"],
                         "target_bytes": made["totals"]["target_bytes"], "top1_source": base,
                         "top1_compressed": before, "top1_finetuned": after,
                         "val_kl_before": rec["val_loss_before"], "val_kl_after": rec["val_loss_after"],
                         "steps_run": rec["steps_run"], "bytes_unchanged": same,
                         "compress_s": round(compress_s, 1), "finetune_s": round(finetune_s, 1)})
            print(rows[-1], flush=True)
            shutil.rmtree(out), shutil.rmtree(tuned)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {"command": "python benchmarks/recovery_vision.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()}, torch {torch.__version__}", "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"recovery_vision_{args.model}.json").write_text(json.dumps(record, indent=1))
    lines = [f"# svdq finetune on the {args.model} trained on Fashion-MNIST", "",
             f"Produced by `{record['command']}` ({record['machine']}). Top-1 on the 10,000 "
             f"test images; fine-tuned {args.steps} steps of {args.batch_size} images (lr "
             f"{args.lr:g}) on {args.train_images} training images, a tenth held out.", "",
             "| compress | × fp16 | source | compressed | fine-tuned | held-out KL | steps | bytes same | compress s | finetune s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['case']}` | {r['target_ratio_fp16']:.3f} | {r['top1_source']:.2%} | "
                     f"{r['top1_compressed']:.2%} | {r['top1_finetuned']:.2%} | "
                     f"{r['val_kl_before']:.4f} → {r['val_kl_after']:.4f} | {r['steps_run']} | "
                     f"{r['bytes_unchanged']} | {r['compress_s']} | {r['finetune_s']} |")
    (args.out / f"recovery_vision_{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
