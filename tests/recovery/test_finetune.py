"""`svdq finetune`: distillation lowers the held-out loss, the artifact keeps its plan, keys,
dtypes and bytes and loads with both loaders, the recorded loss is the stored artifact's, and
bad inputs and Ctrl-C get one line and leave the input untouched."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import svdq
from svdq import cli, runtime
from svdq.cli import app
from svdq.evaluate import load_baseline
from svdq.recovery import data, finetune as ft
from conftest import compress_all, make_model, make_text, one_line_error, planted

FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4"]
CASES = {"gpt2": ["--eps", "0.6", "--bits", "4"],  # low-rank Conv1D layers, NF4 factors
         "llama": ["--eps", "0.08", "--bits", "3", "--residual"],  # int3 + 8-bit corrections
         "bert": ["--ratio", "0.3"]}
TUNE = ["--steps", "30", "--seq-len", "32", "--eval-every", "10", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def artifacts(models, calib_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    return compress_all(models, calib_file, root, CASES)


def tune(artifact: Path, out: Path, calib: Path, *extra: str):
    return CliRunner().invoke(app, ["finetune", str(artifact), "-o", str(out), "--calib",
                                    str(calib), *TUNE, *extra])


def stored(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / runtime.TENSORS), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


def assert_kept(artifact: Path, ft: Path, record: dict) -> None:
    """`ft`, fine-tuned from `artifact`, keeps its keys, dtypes, plan and format, records the
    run, ends no worse on the held-out loss, and loads with both loaders, which agree."""
    old, new = stored(artifact), stored(ft)
    assert old.keys() == new.keys()
    for k in old:
        assert (old[k].shape, old[k].dtype) == (new[k].shape, new[k].dtype), k
    m_old = json.loads((artifact / runtime.MANIFEST).read_text())
    m_new = json.loads((ft / runtime.MANIFEST).read_text())
    assert m_new["layers"] == m_old["layers"] and m_new["totals"] == m_old["totals"]
    assert m_new["format_version"] == m_old["format_version"]
    assert m_new["recovery"] == [record] and record["steps_run"] >= 1
    assert "fine-tuned" in (ft / "README.md").read_text()
    # the held-out loss never ends above where it started: the best state is kept
    assert record["val_loss_after"] <= record["val_loss_before"] * 1.001
    # both loaders, strictly; they agree
    ours = svdq.load(ft)
    spec = importlib.util.spec_from_file_location(f"loader_{ft.name}", ft / "svdq_loader.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    theirs = loader.load(ft)
    ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids=ids), theirs(input_ids=ids)
    key = "logits" if hasattr(a, "logits") else "last_hidden_state"
    torch.testing.assert_close(getattr(a, key), getattr(b, key))


@pytest.mark.parametrize("arch", sorted(CASES))
def test_finetune_keeps_the_stored_form_and_bytes(artifacts, calib_file, arch, tmp_path):
    before = files(artifacts[arch])
    r = tune(artifacts[arch], tmp_path / "ft", calib_file, "--json")
    assert r.exit_code == 0, r.output
    assert files(artifacts[arch]) == before  # the input is only read
    assert_kept(artifacts[arch], tmp_path / "ft", json.loads(r.stdout))


@pytest.mark.parametrize("form", ["sparse", "product"])
def test_sparse_terms_and_attention_products_train_too(models, calib_file, tmp_path, form):
    """A sparse term's values train (its positions stay); a layer storing some output rows
    keeps the others at zero — the fine-tuned artifact loads strictly with both loaders."""
    src = planted("gpt2", tmp_path / "src") if form == "product" else models["gpt2"]
    extra = ["--eps", "0.05", "--attention-product"] if form == "product" else \
        ["--eps", "0.6", "--bits", "4", "--sparse", "0.05"]
    art = compress_all({"gpt2": src}, calib_file, tmp_path / form, {"gpt2": extra})["gpt2"]
    layers = json.loads((art / runtime.MANIFEST).read_text())["layers"]
    assert any(p.get({"sparse": "sparse_nnz", "product": "rows"}[form]) for p in layers)
    r = tune(art, tmp_path / "ft", calib_file, "--json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert_kept(art, tmp_path / "ft", record)
    old, new = stored(art), stored(tmp_path / "ft")
    for k in old:
        if k.endswith((".codes", ".zeros", ".cols", ".rows")):
            assert torch.equal(old[k], new[k]), k
    if form == "sparse":  # (the planted product is near lossless: nothing to win there)
        assert record["val_loss_after"] < 0.99 * record["val_loss_before"], record
        values = [k for k in old if k.endswith(".sparse.values")]
        assert values and any(not torch.equal(old[k], new[k]) for k in values)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_finetune_lowers_the_held_out_loss_and_records_what_is_stored(artifacts, calib_file,
                                                                       arch, tmp_path):
    r = tune(artifacts[arch], tmp_path / "ft", calib_file, "--json")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    # tiny random models: near-uniform outputs leave little to win (GPT-2's NF4 factors'
    # scales: a sixth of the KL; Llama's int3 scales, few 8-bit corrections and norms: less)
    gain = {"gpt2": 0.9, "llama": 0.99}[arch]
    assert record["val_loss_after"] < gain * record["val_loss_before"], record
    old, new = stored(artifacts[arch]), stored(tmp_path / "ft")
    scales = [k for k in old if k.endswith((".absmax", ".scales", ".svdq.s"))]
    assert scales and any(not torch.equal(old[k], new[k]) for k in scales)
    for k in old:  # the codes stay
        if k.endswith((".codes", ".zeros")):
            assert torch.equal(old[k], new[k]), k
    for k in new:
        if k.endswith(".absmax") or new[k].is_floating_point():
            assert torch.isfinite(new[k].float()).all(), k
    # the recorded loss is that of the artifact as written, loaded again
    manifest = json.loads((tmp_path / "ft" / runtime.MANIFEST).read_text())
    teacher = load_baseline(manifest).model.float()
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(tmp_path / "ft"))
    opt = ft.Options(seq_len=32)
    _, val, _ = data.sequences(teacher, tok, str(calib_file), opt.samples, opt.val_samples,
                               opt.seq_len, opt.seed, True)
    student = svdq.load(tmp_path / "ft", dtype="float32")
    got = ft._val_loss(student, teacher, val, opt.batch_size, True)
    assert got == pytest.approx(record["val_loss_after"], rel=1e-3)


def test_progress_shows_the_latest_held_out_loss(artifacts, calib_file, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "LOG_EVERY", 0.0)  # a log line at every step (stderr not a tty)
    r = tune(artifacts["gpt2"], tmp_path / "ft", calib_file, "--json", "--steps", "12",
             "--eval-every", "5")
    assert r.exit_code == 0, r.output
    curve = dict(json.loads(r.stdout)["val_curve"])
    shown = {int(m[1]): float(m[0]) for m in
             re.findall(r"held-out (\S+) \(best \S+\) (\d+)/12", r.stderr)}
    assert sorted(shown) == list(range(1, 13)), r.stderr
    for step, val in shown.items():  # a step shows the held-out loss of the last validation
        last = max(s for s in curve if s < step)
        assert val == pytest.approx(curve[last], abs=6e-5), (step, curve)


def test_checkpointing_computes_the_same(artifacts, calib_file, tmp_path):
    runs = []
    for i, extra in enumerate(([], ["--checkpointing"])):
        r = tune(artifacts["llama"], tmp_path / str(i), calib_file, "--json", "--steps", "5",
                 *extra)
        assert r.exit_code == 0, r.output
        runs.append(json.loads(r.stdout))
    assert runs[0]["val_loss_after"] == pytest.approx(runs[1]["val_loss_after"], rel=1e-4)


def test_bf16_steps_train_too(artifacts, calib_file, tmp_path):
    r = tune(artifacts["gpt2"], tmp_path / "ft", calib_file, "--json", "--bf16")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert record["options"]["bf16"] and record["val_loss_after"] < 0.9 * record["val_loss_before"]


def test_fine_tuning_twice_keeps_both_records(artifacts, calib_file, tmp_path):
    assert tune(artifacts["gpt2"], tmp_path / "a", calib_file).exit_code == 0
    r = tune(tmp_path / "a", tmp_path / "b", calib_file, "--steps", "10")
    assert r.exit_code == 0, r.output
    assert "bytes unchanged" in r.stdout
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "b")]).stdout
    assert shown.count("fine-tuned") == 2
    rec = json.loads((tmp_path / "b" / runtime.MANIFEST).read_text())["recovery"]
    assert [x["options"]["steps"] for x in rec] == [30, 10]


def test_bad_inputs_get_one_line(artifacts, calib_file, tmp_path, models):
    a = artifacts["gpt2"]
    assert "--steps" in one_line_error(tune(a, tmp_path / "o", calib_file, "--steps", "0"))
    assert "--lr" in one_line_error(tune(a, tmp_path / "o", calib_file, "--lr", "-1"))
    assert "own" in one_line_error(tune(a, a / "inner", calib_file))
    assert "does not exist" in one_line_error(tune(a, tmp_path / "o", tmp_path / "none.txt"))
    assert "positions" in one_line_error(tune(a, tmp_path / "o", calib_file, "--seq-len", "999"))
    short = tmp_path / "short.txt"
    short.write_text(make_text(300))
    assert "too few" in one_line_error(tune(a, tmp_path / "o", short, "--seq-len", "64"))
    # another format version
    other = tmp_path / "v99"
    shutil.copytree(a, other)
    m = json.loads((other / runtime.MANIFEST).read_text())
    (other / runtime.MANIFEST).write_text(json.dumps({**m, "format_version": 99}))
    assert "format version" in one_line_error(tune(other, tmp_path / "o", calib_file))
    # the source is gone: fine-tuning distils from it
    src = make_model("gpt2", tmp_path / "src")
    r = CliRunner().invoke(app, ["compress", str(src), "-o", str(tmp_path / "art"), "--calib",
                                 str(calib_file), *FAST, *CASES["gpt2"]])
    assert r.exit_code == 0, r.output
    shutil.rmtree(src)
    assert "distils from it" in one_line_error(tune(tmp_path / "art", tmp_path / "o", calib_file))
    assert not (tmp_path / "o").exists()


def test_ctrl_c_leaves_no_output_and_the_input_untouched(artifacts, calib_file, tmp_path,
                                                         monkeypatch):
    before = files(artifacts["llama"])
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(ft.card, "write", interrupted)  # the last step of writing
    r = tune(artifacts["llama"], tmp_path / "o", calib_file)
    assert calls and "interrupted" in one_line_error(r) and r.exit_code == 130
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]
    assert files(artifacts["llama"]) == before


def test_train_factors_requantizes_them_on_their_grid(artifacts, calib_file, tmp_path):
    r = tune(artifacts["gpt2"], tmp_path / "ft", calib_file, "--json", "--train-factors")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert record["val_loss_after"] < record["val_loss_before"]
    old, new = stored(artifacts["gpt2"]), stored(tmp_path / "ft")
    codes = [k for k in old if k.endswith((".svdq.u.codes", ".svdq.v.codes"))]
    assert codes and any(not torch.equal(old[k], new[k]) for k in codes)
    svdq.load(tmp_path / "ft")


@pytest.mark.parametrize("arch,lr", [("gpt2", "0.1"), ("llama", "0.02")])
def test_train_codes_stores_new_codes_in_the_same_form(artifacts, calib_file, arch, lr, tmp_path):
    """NF4 factors (gpt2), int3 bases with 8-bit corrections (llama): the codes train and the
    artifact keeps its keys, dtypes, bytes and zero points, and loads with both loaders."""
    r = tune(artifacts[arch], tmp_path / "ft", calib_file, "--json", "--train-codes",
             "--codes-lr", lr)
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert record["val_loss_after"] < record["val_loss_before"]
    assert record["options"]["train_codes"] and record["options"]["codes_lr"] == float(lr)
    assert_kept(artifacts[arch], tmp_path / "ft", record)
    old, new = stored(artifacts[arch]), stored(tmp_path / "ft")
    codes = [k for k in old if k.endswith(".codes")]
    assert codes and any(not torch.equal(old[k], new[k]) for k in codes)
    assert all(torch.equal(old[k], new[k]) for k in old if k.endswith(".zeros"))


def test_train_embedding_trains_the_tied_embedding_and_keeps_the_form(artifacts, calib_file,
                                                                      tmp_path):
    r = tune(artifacts["gpt2"], tmp_path / "ft", calib_file, "--json", "--train-embedding")
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)
    assert record["options"]["train_embedding"]
    assert_kept(artifacts["gpt2"], tmp_path / "ft", record)
    old, new = stored(artifacts["gpt2"]), stored(tmp_path / "ft")
    assert not torch.equal(old["transformer.wte.weight"], new["transformer.wte.weight"])


def test_train_codes_and_train_factors_are_one_or_the_other(artifacts, calib_file, tmp_path):
    r = tune(artifacts["gpt2"], tmp_path / "ft", calib_file, "--train-codes", "--train-factors")
    assert r.exit_code == 1 and "--train-factors" in one_line_error(r)
    assert not (tmp_path / "ft").exists()


def test_ce_weight_trains_on_the_next_tokens_too(artifacts, calib_file, tmp_path):
    """--ce-weight adds the cross-entropy on the text's next tokens to the KL: the record names
    the mixed loss, whose held-out value (KL + w × CE) lies above the KL alone and falls; a
    negative weight or a model that is no causal LM gets one line and no output."""
    runs = {}
    for w in ("0", "0.5"):
        r = tune(artifacts["llama"], tmp_path / w, calib_file, "--json", "--ce-weight", w)
        assert r.exit_code == 0, r.output
        runs[w] = json.loads(r.stdout)
    assert runs["0"]["loss"] == "kl_next_token"
    assert runs["0.5"]["loss"] == "kl_next_token + 0.5*ce_next_token"
    assert runs["0.5"]["options"]["ce_weight"] == 0.5
    assert runs["0.5"]["val_loss_before"] > runs["0"]["val_loss_before"] + 0.5
    assert runs["0.5"]["val_loss_after"] < runs["0.5"]["val_loss_before"]
    bad = tune(artifacts["llama"], tmp_path / "neg", calib_file, "--ce-weight", "-1")
    assert "--ce-weight" in one_line_error(bad)
    enc = tune(artifacts["bert"], tmp_path / "enc", calib_file, "--ce-weight", "0.5")
    assert "causal language model" in one_line_error(enc)
    assert not (tmp_path / "neg").exists() and not (tmp_path / "enc").exists()


def test_an_encoder_trained_on_long_sequences_gets_a_warning(artifacts, calib_file, tmp_path,
                                                             monkeypatch):
    """An encoder's loss pools whole sequences: sequences longer than ENCODER_LEN tune it for
    long texts (MiniLM's sentence similarity fell), which the user hears; a causal LM's loss
    is per token and gets none."""
    opt = ft.Options(steps=1, seq_len=32, eval_every=1, calib=str(calib_file))
    heard = {}
    for arch, limit in (("bert", 128), ("bert", 16), ("llama", 16)):
        monkeypatch.setattr(ft, "ENCODER_LEN", limit)
        warnings: list[str] = []
        ft.finetune(artifacts[arch], tmp_path / f"{arch}{limit}", opt, warn=warnings.append)
        heard[arch, limit] = [w for w in warnings if "pooled embedding" in w]
    assert heard["bert", 128] == [] and heard["llama", 16] == []
    assert len(heard["bert", 16]) == 1 and "--seq-len" in heard["bert", 16][0]


def test_the_default_length_suits_the_kind_of_model(artifacts, calib_file, tmp_path, monkeypatch):
    """Without --seq-len a causal LM trains on SEQ_LEN-token sequences and an encoder on
    ENCODER_LEN-token ones (no warning: the user asked for nothing longer), each within its
    context; the manifest records the length used."""
    monkeypatch.setattr(ft, "SEQ_LEN", 24)
    monkeypatch.setattr(ft, "ENCODER_LEN", 16)
    opt = ft.Options(steps=1, eval_every=1, calib=str(calib_file))
    used = {}
    for arch in ("bert", "llama"):
        warnings: list[str] = []
        record = ft.finetune(artifacts[arch], tmp_path / arch, opt, warn=warnings.append)
        used[arch] = record["options"]["seq_len"], record["text"]["length"]
        assert not [w for w in warnings if "pooled embedding" in w]
    assert used == {"bert": (16, 16), "llama": (24, 24)}
