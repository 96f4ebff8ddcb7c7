"""The artifact's model card: written by compress in the Hugging Face form (valid YAML front
matter, the plan per kind), and given the perplexity by `svdq eval --write-card`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import svdq
from svdq.artifact import card
from svdq.cli import app
from conftest import make_text, one_line_error

FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4"]


@pytest.fixture(scope="module")
def artifact(models, calib_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card") / "a"
    r = CliRunner().invoke(app, ["compress", str(models["llama"]), "-o", str(out), "--calib",
                                 str(calib_file), *FAST, "--eps", "0.08", "--bits", "3", "--residual"])
    assert r.exit_code == 0, r.output
    return out


def front(text: str) -> dict:
    lines = text.splitlines()
    assert lines[0] == "---" and "---" in lines[1:]
    return yaml.safe_load("\n".join(lines[1:lines.index("---", 1)]))


def test_compress_writes_a_model_card(artifact):
    text = (artifact / card.CARD).read_text()
    meta = front(text)
    assert meta["library_name"] == "svdq" and "svdq" in meta["tags"]
    assert meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta  # a local folder is no hub id
    manifest = json.loads((artifact / "svdq.json").read_text())
    residual = [p for p in manifest["layers"] if p["kind"] == "residual"]
    assert residual
    row = next(line for line in text.splitlines() if line.startswith("| dense + low-rank"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[1]) == len(residual)
    assert int(cells[4].replace(",", "")) == sum(p["bytes"] for p in residual)
    assert f"{manifest['totals']['artifact_tensor_bytes']:,} bytes" in text
    assert "Not evaluated yet" in text


def test_a_hub_source_names_its_base_model():
    manifest = {"source": {"kind": "hub", "id": "org/model: v2", "revision": "abc"},
                "architecture": "BertModel", "layers": [
                    {"kind": "lowrank", "bits": 8, "rank": 4, "bytes": 10, "fp16_bytes": 40}]}
    meta = front(card.front_matter(manifest))
    assert meta["base_model"] == "org/model: v2"  # quoted: a colon stays part of the id
    assert "pipeline_tag" not in meta and "low-rank" in meta["tags"]


def test_eval_write_card_records_perplexity(artifact, tmp_path):
    import shutil

    artifact = Path(shutil.copytree(artifact, tmp_path / "a"))  # the module's card stays unevaluated
    text = tmp_path / "held.txt"
    text.write_text(make_text(600, seed=5))
    run = ["eval", str(artifact), "--ppl", str(text), "--max-tokens", "256", "--json"]
    r = CliRunner().invoke(app, [*run, "--ctx", "32", "--baseline", "--write-card"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row["ppl"] for row in json.loads(r.stdout)["ppl"]["rows"]}
    (entry,) = json.loads((artifact / card.EVALS).read_text())
    assert entry["ppl"] == rows["artifact"] and entry["baseline_ppl"] == rows["baseline"]
    assert f"{rows['artifact']:.4f}" in (artifact / card.CARD).read_text()
    # again without --baseline: the same entry, the source's figure kept; other windows: a new row
    assert CliRunner().invoke(app, [*run, "--ctx", "32", "--write-card"]).exit_code == 0
    assert CliRunner().invoke(app, [*run, "--ctx", "16", "--write-card"]).exit_code == 0
    evals = json.loads((artifact / card.EVALS).read_text())
    assert [e["ctx"] for e in evals] == [32, 16] and evals[0]["baseline_ppl"] == rows["baseline"]
    front((artifact / card.CARD).read_text())
    svdq.load(artifact)  # the card is outside the checksums: the artifact still verifies


def test_write_card_refuses_in_one_line(artifact, models, tmp_path):
    assert "add --ppl" in one_line_error(CliRunner().invoke(
        app, ["eval", str(artifact), "--similarity", str(tmp_path / "x"), "--write-card"]))
    text = tmp_path / "t.txt"
    text.write_text(make_text(100))
    assert "not an svdq artifact" in one_line_error(CliRunner().invoke(
        app, ["eval", str(models["llama"]), "--ppl", str(text), "--write-card"]))


def test_write_card_describes_an_older_manifest(artifact, tmp_path):
    """A manifest from before the integer grid and GPTQ settings: the card leaves them out."""
    import shutil

    from svdq import runtime

    folder = Path(shutil.copytree(artifact, tmp_path / "old"))
    manifest = json.loads((folder / runtime.MANIFEST).read_text())
    for key in ("grid", "gptq", "method", "sequential", "refit"):
        manifest["settings"]["_data"].pop(key)
    manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    (folder / runtime.MANIFEST).write_text(json.dumps(manifest))
    text = tmp_path / "held.txt"
    text.write_text(make_text(300, seed=5))
    r = CliRunner().invoke(app, ["eval", str(folder), "--ppl", str(text), "--ctx", "32",
                                 "--write-card"])
    assert r.exit_code == 0, r.output
    assert "| held.txt |" in (folder / card.CARD).read_text()
