"""The summary of an artifact's manifest that `compress` prints and `inspect` opens with."""
from __future__ import annotations

from pathlib import Path

from svdq.cli import mb, out


def _kind(p: dict, dtype: str) -> str:
    """A plan entry's form in words: 'low-rank', 'dense 8', 'dense int3', 'residual 4+8' or
    'q·k product 8'."""
    bits = f"int{p['bits']}" if p.get("grid") == "int" else p["bits"]
    if p["kind"] == "lowrank":
        return "low-rank"
    if p["kind"] == "residual":
        return f"residual {bits}+{p['factor_bits']}"
    if p.get("rows"):
        return f"q·k product {bits}"
    if p.get("lookup") is not None:
        return f"embedding {bits}" + (" (tied head)" if p["lookup"] else "")
    return f"dense {bits or dtype}"


def summary(manifest: dict, output: Path) -> None:
    t = manifest["totals"]
    kinds = {}
    for p in manifest["layers"]:
        key = _kind(p, manifest["dtype"])
        kinds[key] = kinds.get(key, 0) + 1
    out.print(f"[bold]{output}[/]: {t['layers']} target layers ("
              + ", ".join(f"{v} {k}" for k, v in kinds.items()) + ")", highlight=False)
    out.print(f"  target layers {mb(t['target_bytes'])} = {t['target_ratio_fp16']:.3f} × fp16; "
              f"whole checkpoint {mb(t['artifact_tensor_bytes'])} = "
              f"{t['checkpoint_ratio_fp16']:.3f} × fp16, {t['checkpoint_ratio_source']:.3f} × "
              f"{manifest['dtype']}", highlight=False)
    if manifest.get("budget"):
        b = manifest["budget"]
        out.print(f"  budget {mb(b['requested_bytes'])} requested, {mb(b['achieved_bytes'])} "
                  f"used ({b['achieved_bytes'] / b['requested_bytes']:.1%}); Σ error² "
                  f"{b['error2']:.4g} over the layers", highlight=False)
        judged = [c for c in b.get("candidates", []) if c["calibration_loss"] is not None]
        if judged:
            out.print(f"  plan: {b['plan']}, the lowest calibration loss of "
                      + "; ".join(f"{c['plan']} {c['calibration_loss']:.5g}" for c in judged),
                      highlight=False)
    sched = manifest.get("schedule")
    if sched:
        out.print(f"  schedule {sched['schedule']}: " + "; ".join(
            f"stage {st['stage']} " + (f"ratio {st['ratio']:.3g}" if st["ratio"] else
                                       f"eps {st['eps']:.3g}")
            + (f" on {len(st['include'])} blocks" if st["include"] else "")
            + (f", fine-tuned {st['val_loss_before']:.4g} → {st['val_loss_after']:.4g}"
               if "val_loss_after" in st else "") for st in sched["stages"]), highlight=False)
    for r in manifest.get("recovery", []) if not sched else []:
        out.print(f"  fine-tuned {r['steps_run']} steps: held-out {r['loss']} "
                  f"{r['val_loss_before']:.4g} → {r['val_loss_after']:.4g}", highlight=False)
    refit = [p for p in manifest["layers"] if "refit" in p]
    if refit:
        def rms(key: str) -> float:
            return (sum(p[key] ** 2 for p in refit) / len(refit)) ** 0.5
        factored = sum(p["kind"] in ("lowrank", "residual") for p in refit)
        out.print(f"  refit: {sum(p['refit'] for p in refit)} of {factored} factored layers; "
                  f"error against the source layers' outputs {rms('source_error_before_refit'):.4f}"
                  f" → {rms('source_error'):.4f} (root mean square over all layers)",
                  highlight=False)
    gpu = manifest.get("device", {})
    if gpu.get("type") == "cuda":
        out.print(f"  ran on {gpu['name']}: at most {gpu['peak_allocated_mb']:,} MB of GPU memory "
                  "allocated", highlight=False)
    out.print(f"  inspect it with: svdq inspect {output}", highlight=False)
