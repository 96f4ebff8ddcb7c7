"""`spectrum.png`: explained variance against rank, a row of panels per layer type (and one
for the attention heads), a column per spectrum, each layer (or head) a line coloured by
depth. A bare matplotlib `Figure`: drawing never touches a caller's pyplot state."""
from __future__ import annotations

from pathlib import Path

from svdq.analysis.spectrum import HEAD_KINDS, KINDS, explained


def draw(result: dict, path: Path) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    import torch

    rows: dict[str, list[tuple[int, dict]]] = {}
    for layer in result["layers"]:
        rows.setdefault(layer["type"], []).append((layer["block"], layer["sv"]))
    for block in result["attention"]["blocks"]:
        for head in block["heads"]:
            rows.setdefault("attention head", []).append((block["block"], head))
    depth = max([b for lines in rows.values() for b, _ in lines] + [1])
    fig = Figure(figsize=(3.2 * len(KINDS), 2.4 * len(rows)))
    axes = fig.subplots(len(rows), len(KINDS), squeeze=False)
    cmap = colormaps["viridis"]
    for r, (kind_of_layer, lines) in enumerate(rows.items()):
        kinds = HEAD_KINDS if kind_of_layer == "attention head" else KINDS
        for c, kind in enumerate(kinds):
            ax = axes[r][c]
            for block, sv in lines:
                if kind in sv and sv[kind]:
                    e = explained(torch.tensor(sv[kind]))
                    ax.plot(range(1, len(e) + 1), e.numpy(), lw=0.7,
                            color=cmap(block / depth), alpha=0.8)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{kind_of_layer}: {kind}", fontsize=8)
            ax.tick_params(labelsize=6)
            if c == 0:
                ax.set_ylabel("explained variance", fontsize=7)
            if r == len(rows) - 1:
                ax.set_xlabel("rank", fontsize=7)
    fig.suptitle(f"{result['model']}: singular value spectra (colour: block depth)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title
    fig.savefig(path, dpi=80)
