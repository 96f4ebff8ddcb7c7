"""`svdq inspect --plot`: an artifact's plan as a picture, for models whose table is too long
to read — per layer the stored bytes (bars coloured by stored form, the fp16 bytes as a line)
with the calibration error on a second axis, the rank, and the bits."""
from __future__ import annotations

from pathlib import Path

COLOURS = {"lowrank": "tab:blue", "residual": "tab:purple", "dense": "tab:orange", "keep": "tab:gray"}
LABELS = {"lowrank": "low-rank", "residual": "dense + low-rank", "dense": "quantized dense",
          "keep": "kept"}
FORMATS = (".png", ".pdf", ".svg")


def draw(manifest: dict, path: Path, title: str) -> None:
    """Draw the plan of `manifest` into `path` (png, pdf or svg, by its suffix)."""
    figure(manifest, title).savefig(path, dpi=120)


def figure(manifest: dict, title: str):
    """The plan's figure: axes bytes (with the error's twin), rank, bits. A bare `Figure`,
    not pyplot's: drawing never changes a caller's backend or figures."""
    from matplotlib.figure import Figure

    layers = manifest["layers"]
    kinds = ["keep" if p["kind"] == "dense" and p["bits"] is None else p["kind"] for p in layers]
    x = range(len(layers))
    fig = Figure(figsize=(max(8, len(layers) / 12), 8))
    top, mid, low = fig.subplots(3, 1, sharex=True, height_ratios=(3, 2, 1.2))
    top.bar(x, [p["bytes"] for p in layers], width=0.85, color=[COLOURS[k] for k in kinds])
    top.step(x, [p["fp16_bytes"] for p in layers], where="mid", color="black", lw=0.8,
             label="fp16 bytes")
    for kind in dict.fromkeys(kinds):
        top.bar([], [], color=COLOURS[kind], label=LABELS[kind])
    top.set_ylabel("stored bytes")
    top.legend(loc="upper left", fontsize=7, ncols=5)
    err = top.twinx()
    err.plot(x, [p["error"] for p in layers], color="tab:red", lw=0.8, marker=".", ms=3)
    err.set_ylabel("relative output error", color="tab:red")
    err.set_ylim(bottom=0)
    mid.bar(x, [p["rank"] if p["kind"] in ("lowrank", "residual") else 0 for p in layers],
            width=0.85, color=[COLOURS[k] for k in kinds])
    mid.set_ylabel("rank")
    # a kept layer is drawn at its source's bits (16 for float16 or bfloat16, 32 for float32)
    source_bits = 32 if manifest.get("dtype") == "float32" else 16
    low.bar(x, [p["bits"] or source_bits for p in layers], width=0.85, color=[COLOURS[k] for k in kinds])
    low.set_ylabel("bits")
    step = max(1, len(layers) // 40)
    low.set_xticks(list(x)[::step], [p["name"] for p in layers][::step], rotation=90, fontsize=6)
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
