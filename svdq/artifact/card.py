"""The artifact's `README.md`, in the Hugging Face model-card form, so a pushed artifact
explains itself: YAML front matter (`base_model` where the source is a hub id, `library_name:
svdq`, `tags`), then the source, the settings, the plan summed up per kind, the bytes, how to
load it, and the evaluations `svdq eval --write-card` recorded (kept in `svdq_eval.json`
beside it, one entry per text and window setting, so the card can be written again).

The card is documentation: neither file is covered by the manifest's checksums.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

CARD = "README.md"
EVALS = "svdq_eval.json"
_KINDS = (("lowrank", "low-rank"), ("residual", "dense + low-rank correction"),
          ("dense", "quantized dense"), ("keep", "kept"),
          ("embedding", "token embedding (looked up; a tied head shares it)"))


def _kind(p: dict) -> str:
    if p.get("lookup") is not None:
        return "embedding"
    return "keep" if p["kind"] == "dense" and p["bits"] is None else p["kind"]


def _bits(p: dict) -> str:
    if p["bits"] is None:
        return "source"
    return f"int{p['bits']}" if p.get("grid") == "int" else str(p["bits"])


def front_matter(manifest: dict) -> str:
    source = manifest["source"]
    lines = ["---"]
    if source["kind"] == "hub":
        lines.append(f"base_model: {json.dumps(source['id'])}")
    lines.append("library_name: svdq")
    kinds = {_kind(p) for p in manifest["layers"]}
    tags = ["svdq", "compressed", "quantized"] + (["low-rank"] if kinds & {"lowrank", "residual"} else [])
    lines.append(f"tags: {json.dumps(tags)}")  # JSON lists and strings are YAML
    if manifest["architecture"].endswith("ForCausalLM"):
        lines.append("pipeline_tag: text-generation")
    elif manifest["architecture"].endswith("ForImageClassification"):
        lines.append("pipeline_tag: image-classification")
    lines.append("---")
    return "\n".join(lines)


def _settings(manifest: dict) -> str:
    """The settings in words; fields older formats lack are left out."""
    s, budget = manifest.get("settings", {}).get("_data", {}), manifest.get("budget")
    if s.get("budget_ratio") is not None:
        goal = f"a byte budget of {s['budget_ratio']} × the target layers' fp16 bytes"
    elif s.get("budget_bytes") is not None or budget is not None:
        goal = f"a byte budget of {s.get('budget_bytes') or budget.get('requested_bytes'):,} bytes"
    else:
        goal = f"at most {s.get('eps')} relative output error per layer" + (
            ", every weight quantized and low rank correcting its error" if s.get("residual") else "")
    how = [f"{s.get('bits')} bits" + (f" ({s['grid']} grid, blocks of {s.get('block_size')})"
                                      if "grid" in s else "")]
    if "gptq" in s:
        how.append(f"GPTQ {'on' if s['gptq'] else 'off'}")
    if "method" in s:
        how.append(f"factorization `{s['method']}`")
    how += [name for name in ("sequential", "refit") if s.get(name)]
    cal = manifest.get("calibration", {})
    data = (f"{cal.get('samples')} images of" if cal.get("kind") == "images"
            else f"{cal.get('samples')} × {cal.get('length')} tokens of")
    return (f"- goal: {goal}\n- {', '.join(how)}\n"
            f"- calibration: {data} `{Path(str(cal.get('source'))).name}`")


def _plan_table(manifest: dict) -> str:
    rows = ["| kind | layers | bits | mean rank | stored bytes | × fp16 |", "|---|---|---|---|---|---|"]
    for kind, label in _KINDS:
        group = [p for p in manifest["layers"] if _kind(p) == kind]
        if not group:
            continue
        bits = ", ".join(sorted({_bits(p) for p in group}))
        ranks = [p["rank"] for p in group if p["kind"] in ("lowrank", "residual")]
        stored, fp16 = sum(p["bytes"] for p in group), sum(p["fp16_bytes"] for p in group)
        rank = f"{sum(ranks) / len(ranks):.1f}" if ranks else "-"
        rows.append(f"| {label} | {len(group)} | {bits} | {rank} | {stored:,} | {stored / fp16:.3f} |")
    return "\n".join(rows)


def _evaluations(evals: list[dict], vision: bool = False) -> str:
    if vision and not evals:
        return ("Not evaluated here: `svdq eval ARTIFACT --accuracy DIR --baseline` measures "
                "its top-1 and top-5 accuracy and agreement with the source.")
    if not evals:
        return ("Not evaluated yet: `svdq eval ARTIFACT --ppl FILE --baseline --write-card` "
                "adds the figures here.")
    rows = ["| text | tokens | window / stride | perplexity | source's perplexity | measured |",
            "|---|---|---|---|---|---|"]
    for e in evals:
        base = f"{e['baseline_ppl']:.4f}" if e.get("baseline_ppl") is not None else "-"
        rows.append(f"| {Path(e['text']).name} | {e['tokens']:,} | {e['ctx']} / {e['stride']} | "
                    f"{e['ppl']:.4f} | {base} | svdq {e['svdq_version']} |")
    return "\n".join(rows)


def _recovery(manifest: dict) -> str:
    """The schedule and the fine-tuning runs, where there were any."""
    lines = []
    sched = manifest.get("schedule")
    if sched:
        lines.append(f"- compressed by the {sched['schedule']} schedule in "
                     f"{len(sched['stages'])} stages")
    for r in manifest.get("recovery", []):
        lines.append(f"- fine-tuned {r['steps_run']} steps by distillation from the source: "
                     f"held-out {r['loss']} {r['val_loss_before']:.4g} → {r['val_loss_after']:.4g}")
    return "".join("\n" + line for line in lines)


def render(manifest: dict, evals: list[dict] = ()) -> str:
    source, totals = manifest["source"], manifest["totals"]
    arch = manifest["architecture"]  # AutoModel would build another class for a model with a head
    return f"""{front_matter(manifest)}

# {Path(str(source['id'])).name}, compressed with svdq

`{manifest['architecture']}` from `{source['id']}`{f" (revision {source['revision']})" if source.get('revision') else ''},
compressed by svdq {manifest['svdq_version']} with low-rank factors and quantization.

- stored tensors: {totals['artifact_tensor_bytes']:,} bytes, {totals['checkpoint_ratio_fp16']:.3f} ×
  the checkpoint in fp16; the {totals['layers']} target layers: {totals['target_ratio_fp16']:.3f} × their fp16 bytes
{_settings(manifest)}{_recovery(manifest)}

## Layers by stored form

{_plan_table(manifest)}

`svdq inspect FOLDER` lists every layer (rank, bits, bytes, error).

## Evaluation

{_evaluations(list(evals), manifest.get("calibration", {}).get("kind") == "images")}

## Use

```python
import svdq  # registers svdq with transformers
from transformers import {arch}
model = {arch}.from_pretrained("FOLDER")  # layers stay compressed in memory
```

`svdq export FOLDER --to hf -o plain/` writes an ordinary transformers folder (layers
de-quantized); `--to peft` writes the quantized base and the low-rank terms as a LoRA adapter.
Without svdq, transformers refuses this folder rather than load it wrongly.
"""


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(folder: Path, manifest: dict) -> None:
    """(Re)write the card of artifact `folder` from `manifest` and the recorded evaluations."""
    _atomic_write(Path(folder) / CARD, render(manifest, read_evals(folder)))


def read_evals(folder: Path) -> list[dict]:
    path = Path(folder) / EVALS
    try:
        evals = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return evals if isinstance(evals, list) else []


def record_eval(folder: Path, manifest: dict, ppl: dict, version: str) -> list[dict]:
    """Add the perplexity report of `svdq eval` (its `ppl` part) to the artifact's evaluations,
    replacing one on the same text and windows, and write the card again."""
    rows = {r["name"]: r for r in ppl["rows"]}
    entry = {"text": ppl["text"], "tokens": ppl["tokens"], "ctx": ppl["ctx"],
             "stride": ppl["stride"], "ppl": rows["artifact"]["ppl"],
             "baseline_ppl": rows["baseline"]["ppl"] if "baseline" in rows else None,
             "svdq_version": version}
    same = ("text", "tokens", "ctx", "stride")
    old = read_evals(folder)
    for e in old:  # a run without --baseline keeps the source's figure of an earlier one
        if all(e.get(k) == entry[k] for k in same) and entry["baseline_ppl"] is None:
            entry["baseline_ppl"] = e.get("baseline_ppl")
    evals = [e for e in old if any(e.get(k) != entry[k] for k in same)] + [entry]
    _atomic_write(Path(folder) / EVALS, json.dumps(evals, indent=1))
    write(folder, manifest)
    return evals
