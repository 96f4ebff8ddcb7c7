"""A sweep's results on disk: the Pareto frontier, results.json, results.csv, frontier.png."""
from __future__ import annotations

import csv
import json
from pathlib import Path


def pareto(rows: list[dict], lower_is_better: bool) -> list[dict]:
    """Rows no other row beats on both bytes (fewer or equal) and quality (better or equal)."""
    def better(a: float, b: float) -> bool:
        return a <= b if lower_is_better else a >= b

    front = []
    for r in rows:
        dominated = any(o is not r and o["target_bytes"] <= r["target_bytes"]
                        and better(o["quality"], r["quality"])
                        and (o["target_bytes"], o["quality"]) != (r["target_bytes"], r["quality"])
                        for o in rows)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r["target_bytes"])


COLUMNS = ["method", "bits", "eps", "ratio", "target_bytes", "target_ratio_fp16", "quality",
           "lowrank_layers", "residual_layers", "layers", "mean_layer_error", "build_s", "eval_s",
           "pareto"]


def write(results: dict, folder: Path, draw: bool = True) -> list[Path]:
    """results.json, results.csv and (with `draw`) frontier.png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["rows"])
    if draw:
        plot(results, folder / "frontier.png")
    return [folder / n for n in ("results.json", "results.csv", "frontier.png")[:2 + draw]]


def plot(results: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, metric = results["rows"], results["metric"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["eps"] is None and r.get("ratio") is None:  # a baseline: one point
            ax.scatter(r["target_bytes"] / 1e6, r["quality"], marker="s", s=60, zorder=3,
                       label=r["method"])
        elif r["eps"] is None:  # a budget: one series per method
            series.setdefault(r["method"], []).append(r)
        else:
            series.setdefault(f"{r['method']} {r['bits']}-bit", []).append(r)
    for label, pts in series.items():
        pts = sorted(pts, key=lambda r: r["target_bytes"])
        ax.plot([p["target_bytes"] / 1e6 for p in pts], [p["quality"] for p in pts], "o-",
                label=label, zorder=2)
        for p in pts:
            tag = f"ε={p['eps']:g}" if p["eps"] is not None else f"r={p['ratio']:g}"
            ax.annotate(tag, (p["target_bytes"] / 1e6, p["quality"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: (r["target_bytes"], r["quality"]))
    ax.step([r["target_bytes"] / 1e6 for r in front], [r["quality"] for r in front],
            where="post", color="black", lw=1, ls="--", label="Pareto frontier", zorder=1)
    ax.set_xlabel("stored bytes of the compressed layers (MB)")
    ax.set_ylabel({"perplexity": "perplexity (lower is better)",
                   "top-1 accuracy": "top-1 accuracy (higher is better)"}.get(
                       metric, "cosine similarity to the source (higher is better)"))
    values = [r["quality"] for r in rows]
    if metric == "perplexity" and max(values) > 3 * min(values):  # a wide range: log scale
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title(f"{Path(results['source']).name}: size vs {metric}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
