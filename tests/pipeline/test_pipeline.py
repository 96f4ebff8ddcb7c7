"""End to end through the library: compress -> save -> load back to the same outputs, the
errors the manifest claims, the sizes it counts, the integer grids in both loaders. The
artifacts come from tests/compressed.py (the `built` fixture), compressed once a session.
"""
from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open

import svdq
from svdq import artifact, runtime
from svdq.calibration import text as calibrate
from svdq.models import layers
from svdq.models import load as hf
from svdq.pipeline.compress import compress
from svdq.config import Settings

from compressed import B8, CASES, G4, G8, G16, KEPT, L4, L8, ids_for, outputs
from conftest import make_tokenizer


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
