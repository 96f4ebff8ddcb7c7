"""`svdq inspect --plot`: the plan drawn per layer, and its bad inputs refused up front."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from svdq.cli import app
from conftest import one_line_error

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def artifact(models, calib_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plot") / "a"
    r = CliRunner().invoke(app, ["compress", str(models["gpt2"]), "-o", str(out), "--calib",
                                 str(calib_file), "--calib-samples", "4", "--calib-len", "32",
                                 "--eps", "0.6", "--bits", "4", "--exclude", "*.mlp.c_proj"])
    assert r.exit_code == 0, r.output
    return out


def heights(ax) -> list[float]:
    return [bar.get_height() for bar in ax.patches]


def test_figure_draws_each_layers_bytes_rank_bits_and_error(artifact):
    from svdq.artifact.plot import figure

    manifest = json.loads((artifact / "svdq.json").read_text())
    layers = manifest["layers"]
    assert {p["kind"] for p in layers} == {"lowrank"} and len(layers) == 6
    fig = figure(manifest, "t")
    top, twin = fig.axes[0], fig.axes[3]
    mid, low = fig.axes[1], fig.axes[2]
    assert heights(top) == [p["bytes"] for p in layers]
    assert heights(mid) == [p["rank"] for p in layers]
    assert heights(low) == [p["bits"] for p in layers]
    assert list(twin.lines[0].get_ydata()) == [p["error"] for p in layers]


def test_inspect_plot_writes_the_file(artifact, tmp_path):
    r = CliRunner().invoke(app, ["inspect", str(artifact), "--plot", str(tmp_path / "plan.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "low-rank" in r.stdout  # the table is still printed


def test_inspect_plot_refuses_in_one_line(artifact, tmp_path):
    assert "ending in .png" in one_line_error(CliRunner().invoke(
        app, ["inspect", str(artifact), "--plot", str(tmp_path / "plan.txt")]))
    assert "does not exist" in one_line_error(CliRunner().invoke(
        app, ["inspect", str(artifact), "--plot", str(tmp_path / "no" / "plan.png")]))


def test_inspect_plot_of_a_mangled_manifest_is_one_line(artifact, tmp_path):
    import shutil

    from svdq import runtime

    folder = Path(shutil.copytree(artifact, tmp_path / "a"))
    manifest = json.loads((folder / runtime.MANIFEST).read_text())
    del manifest["layers"][0]["error"]
    manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    (folder / runtime.MANIFEST).write_text(json.dumps(manifest))
    assert "lacks or mangles" in one_line_error(CliRunner().invoke(
        app, ["inspect", str(folder), "--plot", str(tmp_path / "plan.png")]))
