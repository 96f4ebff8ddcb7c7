"""Artifacts on the Hugging Face hub: `svdq.load("user/name")`, `inspect`, `export` and `eval`
download a repo that holds svdq.json, leave a plain model repo to the model loader, and say
in one line what is wrong offline. The hub is simulated: tests never touch the network."""
from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from typer.testing import CliRunner

import svdq
from svdq import artifact
from svdq.cli import app
from svdq.errors import SvdqError
from svdq.models import load
from conftest import one_line_error


@pytest.fixture(scope="module")
def folder(models, calib_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "a"
    r = CliRunner().invoke(app, ["compress", str(models["gpt2"]), "-o", str(out), "--calib",
                                 str(calib_file), "--calib-samples", "4", "--calib-len", "32",
                                 "--eps", "0.6", "--bits", "4"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def hub(monkeypatch, folder):
    """A hub whose only artifact repo is user/art; user/plain is a model repo."""
    calls = []

    def download(repo, filename, revision=None, local_files_only=False):
        calls.append(("file", repo, local_files_only))
        if repo != "user/art":
            raise EntryNotFoundError(f"{filename} not in {repo}")
        return str(folder / filename)

    def snapshot(repo, revision=None, local_files_only=False):
        calls.append(("snapshot", repo, local_files_only))
        return str(folder)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(load, "hub_reachable", lambda: True)
    return calls


def test_a_hub_artifact_loads_inspects_and_exports(hub, folder, tmp_path):
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        torch.testing.assert_close(svdq.load("user/art")(ids).logits, svdq.load(folder)(ids).logits)
    assert ("snapshot", "user/art", False) in hub
    r = CliRunner().invoke(app, ["inspect", "user/art", "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["layers"]) == 6 + 2  # GPT-2's 2 blocks × 4 layers
    r = CliRunner().invoke(app, ["export", "user/art", "--to", "hf", "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "hf" / "config.json").is_file()


def test_a_plain_model_repo_is_left_to_the_model_loader(hub):
    assert artifact.locate("user/plain") == Path("user/plain")
    assert [c[0] for c in hub] == ["file"]  # svdq.json was asked for, nothing downloaded
    with pytest.raises(SvdqError, match="not an svdq artifact"):
        svdq.load("user/plain")


def test_offline_and_not_cached_is_one_line(monkeypatch, tmp_path):
    def missing(*a, **k):
        raise LocalEntryNotFoundError("not cached")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    monkeypatch.setattr(load, "hub_reachable", lambda: False)
    assert "hub is unreachable" in one_line_error(CliRunner().invoke(app, ["inspect", "user/art"]))
    assert "hub is unreachable" in one_line_error(
        CliRunner().invoke(app, ["export", "user/art", "--to", "hf", "-o", str(tmp_path / "x")]))
    # eval takes plain models too: an uncached id goes on to the model loader (and its
    # offline copies of well-known checkpoints)
    assert artifact.locate("user/art", required=False) == Path("user/art")
