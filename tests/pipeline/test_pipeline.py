"""End to end through the library: compress -> save -> load, the standalone loader, sizes, and
strict loading of damaged artifacts.

Tiny random models have flat spectra, so low-rank layers appear only at large eps (0.1-0.4
here); each case below was chosen to give a mix of low-rank and dense layers, and the test
checks it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import svdq
from svdq import artifact, runtime
from svdq.calibration import text as calibrate
from svdq.models import layers
from svdq.models import load as hf
from svdq.pipeline.compress import compress
from svdq.config import Settings
from svdq.errors import SvdqError

from conftest import as_format, make_text, make_tokenizer

CALIB = dict(calib_samples=4, calib_len=32, batch_size=4)

# (arch, eps, bits) -> a plan with at least one low-rank and at least one dense layer
G4, G8, G16 = ("gpt2", 0.1, 4), ("gpt2", 0.1, 8), ("gpt2", 0.1, 16)
L4, L8 = ("llama", 0.4, 4), ("llama", 0.35, 8)
B8 = ("bert", 0.15, 8)
KEPT = ("gpt2", 0.03, 4)  # NF4 error ~0.03: low-rank, dense 4-bit and kept-as-is layers at once
CASES = [G4, G8, G16, L4, L8, B8, KEPT]


def ids_for(tokenizer, n_words: int = 24, seed: int = 5) -> torch.Tensor:
    return torch.tensor([tokenizer(make_text(n_words, seed), add_special_tokens=False)["input_ids"]])


def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class Built:
    """One compressed model: the in-memory result, its outputs, and the saved artifact."""

    def __init__(self, arch, folder, out, eps, bits, calib_file):
        self.arch, self.folder, self.out = arch, folder, out
        self.source = hf.load_source(str(folder))
        self.settings = Settings(eps=eps, bits=bits, calib=str(calib_file), **CALIB)
        self.result = compress(self.source, self.settings)
        self.manifest = artifact.save(out, self.source, self.result, self.settings)
        self.ids = ids_for(self.source.tokenizer)
        self.expected = outputs(self.result.model, self.ids)

    def kinds(self) -> list[str]:
        return [p["kind"] if p["kind"] == "lowrank" or p["bits"] is None else f"dense{p['bits']}"
                for p in self.result.layers]


@pytest.fixture(scope="module")
def biased(models, tmp_path_factory) -> dict[str, Path]:
    """The tiny models with random (not zero, as initialized) biases and norm parameters, so
    that losing or misplacing a bias shows in the outputs."""
    import transformers

    root = tmp_path_factory.mktemp("biased")
    out = dict(models)
    for arch in ("gpt2", "bert"):
        model = transformers.AutoModel.from_pretrained(models[arch]) if arch == "bert" else \
            transformers.GPT2LMHeadModel.from_pretrained(models[arch])
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "ln" in name or "LayerNorm" in name:
                    p.add_(0.2 * torch.randn(p.shape, generator=gen))
        shutil.copytree(models[arch], root / arch)
        model.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


@pytest.fixture(scope="module")
def built(biased, calib_file, tmp_path_factory):
    """build(arch, eps, bits) -> Built, each combination compressed once per module."""
    cache: dict[tuple, Built] = {}
    root = tmp_path_factory.mktemp("artifacts")

    def build(arch: str, eps: float, bits: int) -> Built:
        key = (arch, eps, bits)
        if key not in cache:
            cache[key] = Built(arch, biased[arch], root / f"{arch}-{eps}-{bits}", eps, bits, calib_file)
        return cache[key]
    return build


def damaged_copy(b: Built, tmp_path: Path) -> Path:
    dest = tmp_path / "damaged"
    shutil.copytree(b.out, dest)
    return dest


def rewrite_manifest(folder: Path, **changes) -> dict:
    """Edit the manifest and re-seal its own checksum, so the checks behind it are what a test
    meets (an edit without re-sealing is refused by the checksum: tests/test_reliability.py)."""
    manifest = json.loads((folder / runtime.MANIFEST).read_text())
    manifest.update(changes)
    if "manifest_sha256" in manifest:
        manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    (folder / runtime.MANIFEST).write_text(json.dumps(manifest))
    return manifest


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("case", CASES, ids=[f"{a}-eps{e}-{b}bit" for a, e, b in CASES])
def test_round_trip_equal_outputs(built, case):
    b = built(*case)
    kinds = b.kinds()
    assert "lowrank" in kinds and any(k != "lowrank" for k in kinds), kinds
    assert all(p["bits"] == case[2] for p in b.result.layers if p["kind"] == "lowrank")
    # the in-memory model really holds the stored modules
    lowrank = [m for m in b.result.model.modules() if isinstance(m, runtime.LowRankLinear)]
    assert len(lowrank) == kinds.count("lowrank")

    loaded = svdq.load(b.out, dequantize=True)  # float layers, as the pipeline builds them
    assert not loaded.training
    got = outputs(loaded, b.ids)
    assert got.shape == b.expected.shape
    assert torch.equal(got, b.expected)
    assert sum(isinstance(m, runtime.LowRankLinear) for m in loaded.modules()) == len(lowrank)
    for p in b.manifest["layers"]:
        m = loaded.get_submodule(p["name"])
        if p["kind"] == "lowrank":
            assert m.rank == p["rank"] and (m.u.shape, m.v.shape) == (
                (p["rank"], p["out_features"]), (p["rank"], p["in_features"]))
    # kept as stored (the default): the same model within float tolerance, every target
    # layer that is not kept a StoredLinear of its plan's kind and rank
    packed = svdq.load(b.out)
    assert torch.allclose(outputs(packed, b.ids), b.expected, rtol=1e-4, atol=1e-4)
    for p in b.manifest["layers"]:
        m = packed.get_submodule(p["name"])
        if p["kind"] != "dense" or p["bits"] is not None:
            assert isinstance(m, runtime.StoredLinear) and m.kind == p["kind"]
            assert m.rank == (p["rank"] if p["kind"] != "dense" else 0)
    # the manifest describes what was written
    m = b.manifest
    assert m == json.loads((b.out / runtime.MANIFEST).read_text())
    assert m["format_version"] == runtime.PLAIN_FORMAT  # 6 only with stored_dtype
    assert m["settings"]["_data"]["eps"] == case[1] and m["settings"]["_data"]["bits"] == case[2]
    assert Settings.from_dict(m["settings"]) == b.settings
    assert m["calibration"]["tokens"] == 4 * 32
    assert all(p["error"] <= case[1] for p in m["layers"])
    assert {"config.json", "svdq_loader.py", "tokenizer.json"} <= {f.name for f in b.out.iterdir()}


def test_round_trip_with_layers_kept_as_they_are(built):
    b = built(*KEPT)
    kinds = b.kinds()
    assert {"dense", "dense4", "lowrank"} <= set(kinds), kinds  # "dense": kept in the source dtype
    loaded = svdq.load(b.out, dequantize=True)
    assert torch.equal(outputs(loaded, b.ids), b.expected)
    with safe_open(b.out / runtime.TENSORS, "pt") as f:
        keys = set(f.keys())
    conv1d = layers.conv1d_type()
    for p in b.manifest["layers"]:
        if p["bits"] is None:  # stored under its own name, in its own (in, out) Conv1D layout
            assert p["name"] + ".weight" in keys
            assert isinstance(loaded.get_submodule(p["name"]), conv1d)
        elif p["kind"] == "dense":
            assert p["name"] + ".svdq.weight.codes" in keys and p["name"] + ".weight" in keys
            assert isinstance(loaded.get_submodule(p["name"]), torch.nn.Linear)
        else:
            assert p["name"] + ".svdq.u.codes" in keys and p["name"] + ".weight" in keys
        if runtime.marked(p):  # the empty marker a loader that ignores svdq stumbles on
            with safe_open(b.out / runtime.TENSORS, "pt") as f:
                assert f.get_slice(p["name"] + ".weight").get_shape() == [0]


def test_llama_tied_embeddings_stored_once_and_generate(built):
    b = built(*L4)
    with safe_open(b.out / runtime.TENSORS, "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys
    assert "lm_head.weight" not in keys
    assert b.manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = svdq.load(b.out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    prompt = b.ids[:, :5]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
              do_sample=False, pad_token_id=2)
    with torch.no_grad():
        got = loaded.generate(prompt, **kw)
        want = b.result.model.generate(prompt, **kw)
    assert got.shape == (1, 11)
    assert torch.equal(got, want)


def test_gpt2_tied_embeddings_stored_once(built):
    b = built(*G8)
    with safe_open(b.out / runtime.TENSORS, "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert b.manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}


@pytest.mark.parametrize("case", [G4, L8, B8, KEPT],
                         ids=["gpt2-4bit", "llama-8bit", "bert-8bit", "gpt2-kept"])
def test_loaded_layers_have_the_errors_the_manifest_claims(built, case):
    """Each layer of the loaded artifact, fed the inputs the original layer sees on the
    calibration text, is off by exactly the error recorded in the manifest (which the search
    computed from Gram matrices, never from the stored module itself)."""
    b = built(*case)
    original = hf.load_source(str(b.folder)).model
    ids, _ = calibrate.calibration_ids(original, b.source.tokenizer, str(b.settings.calib),
                                       b.settings.calib_samples, b.settings.calib_len,
                                       b.settings.batch_size, b.settings.seed, b.source.is_causal)
    inputs, handles = {}, []
    for p in b.manifest["layers"]:
        hook = (lambda name: lambda m, args: inputs.__setitem__(name, args[0].detach().clone()))(p["name"])
        handles.append(original.get_submodule(p["name"]).register_forward_pre_hook(hook))
    try:
        outputs(original, ids)
    finally:
        for h in handles:
            h.remove()
    loaded = svdq.load(b.out)
    for p in b.manifest["layers"]:
        x = inputs[p["name"]]
        with torch.no_grad():
            want = original.get_submodule(p["name"])(x).double()
            got = loaded.get_submodule(p["name"])(x).double()
        error = float((got - want).norm() / want.norm())
        assert error == pytest.approx(p["error"], rel=1e-3, abs=1e-6), p["name"]
        assert error <= case[1] * (1 + 1e-3)


# ----------------------------------------------------------------------------- standalone loader
LOADER_SCRIPT = r"""
import importlib.util, runpy, sys
site, jobs = sys.argv[1].split("\0"), sys.argv[2:]
sys.path.extend(site)  # plain folders: no .pth file runs, so svdq's editable finder is absent
assert importlib.util.find_spec("svdq") is None, "svdq is importable in the loader test"
import torch
for artifact, ids_file, out_file in zip(jobs[0::3], jobs[1::3], jobs[2::3]):
    sys.path.insert(0, artifact)
    sys.modules.pop("svdq_loader", None)
    import svdq_loader
    assert svdq_loader.__file__.startswith(artifact), svdq_loader.__file__
    model = svdq_loader.load(artifact)
    ids = torch.load(ids_file)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    torch.save(out.logits if hasattr(out, "logits") else out.last_hidden_state, out_file)
    sys.argv = [svdq_loader.__file__, artifact]  # and as a script: python svdq_loader.py ARTIFACT
    try:
        runpy.run_path(svdq_loader.__file__, run_name="__main__")
    except SystemExit as e:
        assert e.code == 0, e.code
    sys.path.remove(artifact)
assert not any(m == "svdq" or m.startswith("svdq.") for m in sys.modules), "svdq got imported"
"""


def test_standalone_loader_without_svdq(built, tmp_path):
    cases = {"llama": built(*L4), "gpt2": built(*G16), "bert": built(*B8)}
    script = tmp_path / "run_loader.py"
    script.write_text(LOADER_SCRIPT)
    jobs = []
    for name, b in cases.items():
        assert (b.out / "svdq_loader.py").read_bytes() == Path(runtime.__file__).read_bytes()
        torch.save(b.ids, tmp_path / f"{name}-ids.pt")
        jobs += [str(b.out), str(tmp_path / f"{name}-ids.pt"), str(tmp_path / f"{name}-out.pt")]
    paths = sysconfig.get_paths()
    site = "\0".join(sorted({paths["purelib"], paths["platlib"]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["OMP_NUM_THREADS"] = "1"  # as in this process (see conftest.one_thread)
    # -I: no PYTHONPATH, no user site, no script folder; -S: no site module, so no .pth files
    proc = subprocess.run([sys.executable, "-I", "-S", str(script), site, *jobs],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("low-rank layers") == len(cases), proc.stdout
    for name, b in cases.items():
        got = torch.load(tmp_path / f"{name}-out.pt")
        assert torch.equal(got, outputs(svdq.load(b.out), b.ids)), name
        assert torch.equal(got, b.expected), name


# ----------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("case", [G4, G16, B8, KEPT],
                         ids=["gpt2-4bit", "gpt2-16bit", "bert-8bit", "gpt2-kept"])
def test_sizes_match_the_tensors_file(built, case):
    b = built(*case)
    path = b.out / runtime.TENSORS
    with safe_open(path, "pt") as f:
        sizes = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    total = sum(sizes.values())
    assert total == len(raw) - 8 - header  # every data byte of the file belongs to a tensor
    t = b.manifest["totals"]
    assert t["artifact_tensor_bytes"] == total
    attributed = set()
    for p in b.manifest["layers"]:
        mine = {k for k in sizes if k.startswith(p["name"] + ".")}
        assert mine, p["name"]
        assert p["bytes"] == sum(sizes[k] for k in mine), p["name"]
        attributed |= mine
    for p in b.manifest["layers"]:
        assert p["fp16_bytes"] == 2 * (p["out_features"] * p["in_features"]
                                       + (p["out_features"] if p["bias"] else 0)), p["name"]
    assert t["target_fp16_bytes"] == sum(p["fp16_bytes"] for p in b.manifest["layers"])
    assert t["target_bytes"] == sum(p["bytes"] for p in b.manifest["layers"])
    assert t["layers"] == len(b.manifest["layers"])
    assert t["lowrank_layers"] == b.kinds().count("lowrank")
    codebooks = {k for k in sizes if k.startswith("svdq.codebook.")}
    assert codebooks == ({f"svdq.codebook.{case[2]}"} if case[2] != 16 else set())
    # whatever is neither a layer's nor a codebook is an untouched model tensor (embeddings, norms)
    rest = set(sizes) - attributed - codebooks
    assert rest and not any(".svdq." in k or k.endswith((".codes", ".absmax")) for k in rest)
    fresh = hf.load_source(str(b.folder)).model  # b.source.model was compressed in place
    assert t["source_params"] == sum(p.numel() for p in fresh.parameters())
    assert t["checkpoint_ratio_fp16"] == pytest.approx(total / (2 * t["source_params"]))


# ----------------------------------------------------------------------------- strict loading
def _fails(folder: Path, match: str, verify: bool = True, read: bool = True) -> None:
    with pytest.raises(SvdqError, match=match) as info:
        svdq.load(folder, verify=verify)
    assert "\n" not in str(info.value)
    if read:
        with pytest.raises(SvdqError, match=match):
            artifact.read(folder, verify=verify)


def test_load_refuses_wrong_format_version(built, tmp_path):
    folder = damaged_copy(built(*G8), tmp_path)
    rewrite_manifest(folder, format_version=runtime.FORMAT_VERSION + 1)
    _fails(folder, f"format version {runtime.FORMAT_VERSION + 1}")


@pytest.mark.parametrize("version", [1, 4])
def test_load_reads_older_formats(built, tmp_path, version):
    """Version 2 added the residual kind, 5 moved quantized weights under NAME.svdq.weight
    beside an empty NAME.weight marker: artifacts written before still load, to the same
    model, in both loaders."""
    b = built(*G8)
    folder = damaged_copy(b, tmp_path)
    as_format(folder, version, checksum=version >= 3)
    assert not any(k.endswith(".svdq.weight.codes") for k in runtime.load_tensors(
        folder, runtime.read_manifest(folder)))
    for dequantize in (False, True):
        new, old = svdq.load(b.out, dequantize=dequantize), svdq.load(folder, dequantize=dequantize)
        assert torch.equal(outputs(old, b.ids), outputs(new, b.ids))


def test_load_refuses_checksum_mismatch(built, tmp_path):
    folder = damaged_copy(built(*G8), tmp_path)
    path = folder / runtime.TENSORS
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of tensor data: the file still parses
    path.write_bytes(bytes(raw))
    load_file(path)
    _fails(folder, "does not match the checksum")


def test_load_refuses_truncated_tensors(built, tmp_path):
    folder = damaged_copy(built(*G8), tmp_path)
    path = folder / runtime.TENSORS
    path.write_bytes(path.read_bytes()[:-1000])
    _fails(folder, "does not match the checksum")
    _fails(folder, "cannot read", verify=False, read=False)  # unverified: the file itself is refused
    artifact.read(folder, verify=False)  # the manifest alone is fine


def _rewrite_tensors(folder: Path, change) -> None:
    path = folder / runtime.TENSORS
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    rewrite_manifest(folder, sha256=runtime.sha256(path))  # consistent checksum: only content is wrong


def test_load_refuses_tensors_the_manifest_does_not_explain(built, tmp_path):
    folder = damaged_copy(built(*G8), tmp_path)
    _rewrite_tensors(folder, lambda t: t.update({"transformer.h.0.attn.extra": torch.zeros(3)}))
    artifact.read(folder)  # checksum and version are fine
    _fails(folder, "tensors the manifest does not explain", read=False)


def test_load_refuses_layer_missing_from_manifest(built, tmp_path):
    b = built(*G8)
    folder = damaged_copy(b, tmp_path)
    manifest = json.loads((folder / runtime.MANIFEST).read_text())
    lowrank = [p for p in manifest["layers"] if p["kind"] == "lowrank"]
    manifest["layers"].remove(lowrank[0])
    rewrite_manifest(folder, layers=manifest["layers"])
    # the model then expects the layer's plain weight, where only the empty marker is stored
    _fails(folder, f"tensor '{lowrank[0]['name']}.weight' is torch.uint8 \\(0,\\)", read=False)


@pytest.mark.parametrize("which", ["lowrank factor", "untouched", "bias", "codebook"])
def test_load_refuses_missing_tensor(built, tmp_path, which):
    b = built(*G8)
    lowrank = next(p["name"] for p in b.manifest["layers"] if p["kind"] == "lowrank")
    key = {"lowrank factor": lowrank + ".svdq.v.absmax", "untouched": "transformer.ln_f.weight",
           "bias": lowrank + ".bias", "codebook": "svdq.codebook.8"}[which]
    folder = damaged_copy(b, tmp_path)
    _rewrite_tensors(folder, lambda t: t.pop(key))
    _fails(folder, f"tensor '{key}' is missing", read=False)


def test_load_unverified_after_deleting_a_key(built, tmp_path):
    folder = damaged_copy(built(*L4), tmp_path)
    path = folder / runtime.TENSORS
    tensors = load_file(path)
    del tensors["model.norm.weight"]
    save_file(tensors, str(path))  # checksum left stale on purpose
    _fails(folder, "does not match the checksum")
    _fails(folder, "'model.norm.weight' is missing", verify=False, read=False)


def test_load_refuses_missing_manifest(built, tmp_path):
    folder = damaged_copy(built(*G8), tmp_path)
    (folder / runtime.MANIFEST).unlink()
    _fails(folder, "not an svdq artifact")
    _fails(tmp_path / "nowhere", "not an svdq artifact")


def test_load_refuses_invalid_json(built, tmp_path):
    folder = damaged_copy(built(*G8), tmp_path)
    text = (folder / runtime.MANIFEST).read_text()
    (folder / runtime.MANIFEST).write_text(text[: len(text) // 2])
    _fails(folder, "not valid JSON")
    (folder / runtime.MANIFEST).write_bytes(b"\xff\xfe{not json")
    _fails(folder, "not valid JSON")


def test_load_refuses_missing_tensors_file(built, tmp_path):
    folder = damaged_copy(built(*G8), tmp_path)
    (folder / runtime.TENSORS).unlink()
    _fails(folder, "is missing")


# ----------------------------------------------------------------------------- atomic save
def test_save_removes_its_temp_folder_on_failure(models, calib_file, tmp_path, monkeypatch):
    source = hf.load_source(str(models["bert"]))
    settings = Settings(eps=0.3, bits=8, calib=str(calib_file), **CALIB)
    result = compress(source, settings)
    parent = tmp_path / "parent"
    out = parent / "out"
    seen = []

    def boom(path):
        seen.append(Path(path))
        assert Path(path).is_file() and Path(path).stat().st_size > 0  # tensors already written
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(runtime, "sha256", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        artifact.save(out, source, result, settings)
    assert seen and seen[0].parent.name.endswith(".partial")
    assert list(parent.iterdir()) == []

    # overwriting: a failed save leaves the old artifact in place, untouched
    monkeypatch.undo()
    artifact.save(out, source, result, settings)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(runtime, "sha256", boom)
    with pytest.raises(RuntimeError):
        artifact.save(out, source, result, settings, overwrite=True)
    assert [p.name for p in parent.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # the last step fails (the finished folder cannot be renamed into place): the old
    # artifact, already moved aside, is put back
    monkeypatch.undo()
    rename = Path.rename

    def failing_rename(self, target):
        if self.name.endswith(".partial"):
            raise OSError("rename refused")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="rename refused"):
        artifact.save(out, source, result, settings, overwrite=True)
    monkeypatch.undo()
    assert [p.name for p in parent.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_save_refuses_non_empty_output(built, tmp_path):
    b = built(*B8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SvdqError, match="not empty"):
        artifact.save(out, b.source, b.result, b.settings)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(SvdqError, match="not an svdq artifact"):  # overwrite replaces artifacts only
        artifact.save(out, b.source, b.result, b.settings, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    (out / "svdq.json").write_text("{}")  # an artifact (of sorts): replaced
    artifact.save(out, b.source, b.result, b.settings, overwrite=True)
    assert torch.equal(outputs(svdq.load(out), b.ids), b.expected)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .old, .partial or .lock left


# ----------------------------------------------------------------------------- full size
@pytest.mark.slow
def test_full_size_gpt2_round_trip(tmp_path, calib_file):
    """GPT-2 124M shapes, random weights: compresses, saves and loads back exactly (about 40 s
    on the one thread `conftest.one_thread` leaves; 48 SVDs are most of it). The time is
    printed, not asserted: speed is the benchmarks' business, and a shared machine took 360 s."""
    import transformers

    folder = tmp_path / "gpt2-124m"
    folder.mkdir()
    tok = make_tokenizer(folder)
    config = transformers.GPT2Config(architectures=["GPT2LMHeadModel"], bos_token_id=1,
                                     eos_token_id=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    assert config.vocab_size == 50257 and config.n_layer == 12 and config.n_embd == 768

    start = time.perf_counter()
    source = hf.load_source(str(folder))
    settings = Settings(eps=0.05, bits=8, calib=str(calib_file), calib_samples=4, calib_len=64,
                        batch_size=4)
    result = compress(source, settings)
    manifest = artifact.save(tmp_path / "out", source, result, settings)
    compressed = time.perf_counter() - start
    assert len(manifest["layers"]) == 48
    assert all(p["error"] <= 0.05 for p in manifest["layers"])
    ids = ids_for(tok, 40)
    expected = outputs(result.model, ids)
    loaded = svdq.load(tmp_path / "out")
    got = outputs(loaded, ids)
    elapsed = time.perf_counter() - start
    print(f"\n124M GPT-2: compress+save {compressed:.1f}s, total with load {elapsed:.1f}s; "
          f"{manifest['totals']['artifact_tensor_bytes'] / 1e6:.1f} MB")
    assert got.shape == (1, ids.shape[1], 50257)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("extra", [["--bits", "3", "--eps", "0.4"],
                                   ["--bits", "2", "--residual", "--eps", "0.25"],
                                   ["--bits", "4", "--grid", "int", "--block-size", "32",
                                    "--eps", "0.3", "--no-gptq"]],
                         ids=["int3", "int2-residual", "int4-rounded"])
def test_integer_grid_artifacts_load_in_both_loaders(models, calib_file, tmp_path, extra):
    """Codes, float16 scales and packed zero points round-trip, bit for bit, through svdq and
    the standalone loader copied into the artifact (format version 4)."""
    import importlib.util

    from typer.testing import CliRunner

    from svdq.cli import app

    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["compress", str(models["llama"]), "-o", str(out), "--calib",
                                 str(calib_file), "--calib-samples", "4", "--calib-len", "32",
                                 *extra])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / runtime.MANIFEST).read_text())
    assert manifest["format_version"] == runtime.PLAIN_FORMAT
    weights = [p for p in manifest["layers"] if p["kind"] in ("dense", "residual") and p["bits"]]
    assert weights and {p.get("grid") for p in weights} == {"int"}, manifest["layers"]
    spec = importlib.util.spec_from_file_location("copied_loader", out / "svdq_loader.py")
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)
    a, b = svdq.load(out), copied.load(out)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    stored = runtime.load_tensors(out, manifest)
    layer = weights[0]
    codes = stored[layer["name"] + ".svdq.weight.codes"]
    assert codes.numel() == -(-layer["out_features"] * layer["in_features"] * layer["bits"] // 8)
