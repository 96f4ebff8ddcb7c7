"""`svdq compress --attention-product`: on models whose heads' products are of low rank the
query and key layers shrink together, every loader computes what compress had in memory, and
what the product cannot serve is refused in one line."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from svdq import runtime
from svdq.cli import app
from svdq.errors import SvdqError
from conftest import FAST, one_line_error, planted

run = CliRunner().invoke
ARCHS = {"bert": "BertModel", "gpt2": "GPT2LMHeadModel"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, calib_file):
    root = tmp_path_factory.mktemp("product")
    out = {}
    for arch in ARCHS:
        src = planted(arch, root / f"src-{arch}")
        for flag in ("--attention-product", "--no-product"):
            folder = root / f"{arch}{flag}"
            extra = [flag] if flag == "--attention-product" else []
            r = run(app, ["compress", str(src), "-o", str(folder), "--calib", str(calib_file),
                          *FAST, "--eps", "0.05", *extra])
            assert r.exit_code == 0, r.output
            assert ("q·k product 8" in r.output) == bool(extra)  # the summary names the form
            out[arch, flag] = folder
        out[arch] = src
    return out


def _manifest(folder):
    return json.loads((folder / runtime.MANIFEST).read_text())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_queries_and_keys_shrink_together_within_eps(artifacts, arch):
    product = _manifest(artifacts[arch, "--attention-product"])
    plain = _manifest(artifacts[arch, "--no-product"])
    assert product["format_version"] == 8 and plain["format_version"] in (5, 6)
    paired = [p for p in product["layers"] if p.get("rows")]
    assert len(paired) == (4 if arch == "bert" else 2)  # q and k of both blocks; GPT-2: c_attn
    for p in paired:
        note = p["attention_product"]
        assert p["error"] <= 0.05 and note["score_error"] <= 0.05
        assert all(r <= 2 for r in note["heads"])  # the planted rank per head is enough
        kept = sum(n for _, n in p["rows"])
        assert kept == sum(note["heads"]) * (2 if arch == "gpt2" else 1) \
            + (64 if arch == "gpt2" else 0)  # GPT-2 keeps its values' rows
    names = {p["name"] for p in paired}
    mine = sum(p["bytes"] for p in product["layers"] if p["name"] in names)
    theirs = sum(p["bytes"] for p in plain["layers"] if p["name"] in names)
    assert mine < theirs  # taken only where it stores fewer bytes
    others = [(p["name"], p["bytes"]) for p in product["layers"] if p["name"] not in names]
    assert others == [(p["name"], p["bytes"]) for p in plain["layers"] if p["name"] not in names]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_loader_computes_the_product_model(artifacts, arch):
    import transformers

    from svdq import load

    folder = artifacts[arch, "--attention-product"]
    ids = torch.randint(3, 60, (2, 16))
    spec = importlib.util.spec_from_file_location("svdq_loader_pair_product", folder / "svdq_loader.py")
    standalone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standalone)
    auto = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    models = [load(folder), load(folder, dequantize=True), standalone.load(folder),
              auto.from_pretrained(folder)]
    source = getattr(transformers, ARCHS[arch]).from_pretrained(artifacts[arch])
    with torch.no_grad():
        outs = [m.eval()(ids)[0] for m in models]
        ref = source.eval()(ids)[0]
    for y in outs[1:]:
        assert torch.allclose(y, outs[0], atol=1e-5 * float(outs[0].abs().max()))
    assert float((outs[0] - ref).norm() / ref.norm()) < 0.05  # a faithful model of the source
    stored = [m for m in models[0].modules() if isinstance(m, runtime.StoredLinear)
              and m.index is not None]
    assert stored and all(m.svdq.weight.shape[0] < m.out_features for m in stored)


def test_export_folds_the_product_into_plain_layers(artifacts, tmp_path):
    import transformers

    from svdq import load

    folder = artifacts["bert", "--attention-product"]
    r = run(app, ["export", str(folder), "--to", "hf", "-o", str(tmp_path / "hf"),
                  "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    ids = torch.randint(3, 60, (2, 16))
    plain = transformers.AutoModel.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        a, b = load(folder).eval()(ids)[0], plain.eval()(ids)[0]
    assert torch.allclose(a, b, atol=1e-5 * float(a.abs().max()))


def test_inspect_shows_the_rows_per_head(artifacts):
    r = run(app, ["inspect", str(artifacts["bert", "--attention-product"])], terminal_width=200)
    assert r.exit_code == 0 and "q·k product" in r.output


def test_what_the_product_cannot_serve_is_refused(models, calib_file, artifacts, tmp_path):
    def fails(*args):
        return one_line_error(run(app, ["compress", *map(str, args), "--calib", str(calib_file),
                                        *FAST, "--attention-product"]))
    assert "rotary" in fails(models["llama"], "-o", tmp_path / "l")
    assert "--bits 16" in fails(models["bert"], "-o", tmp_path / "b", "--bits", "16")
    assert not (tmp_path / "l").exists() and not (tmp_path / "b").exists()
    # (fine-tuning takes it: tests/recovery)
    r = run(app, ["finetune", str(artifacts["bert", "--attention-product"]), "-o",
                  str(tmp_path / "ft"), "--calib", str(calib_file), "--steps", "1"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("rows", [[[0, 1], [0, 1]], [[60, 10]], [[0, 0]], "all", [[0, 1.5]]])
def test_damaged_rows_are_refused_by_the_loader(artifacts, tmp_path, rows):
    import shutil

    from svdq import load

    folder = tmp_path / "a"
    shutil.copytree(artifacts["bert", "--attention-product"], folder)
    manifest = _manifest(folder)
    entry = next(p for p in manifest["layers"] if p.get("rows"))
    entry["rows"] = rows
    manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    (folder / runtime.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SvdqError, match="invalid rows"):
        load(folder)


def test_random_heads_keep_their_own_forms(models, calib_file, tmp_path):
    """Random weights have full-rank products: at a tight eps the product keeps nearly every
    row, never stores fewer bytes than the two layers' own forms, and nothing changes."""
    folders = {}
    for flag in ([], ["--attention-product"]):
        folder = tmp_path / ("p" if flag else "n")
        r = run(app, ["compress", str(models["bert"]), "-o", str(folder), "--calib",
                      str(calib_file), *FAST, "--eps", "0.02", *flag])
        assert r.exit_code == 0, r.output
        folders[bool(flag)] = [(p["name"], p["bytes"], p.get("rows"))
                               for p in _manifest(folder)["layers"]]
    assert folders[True] == folders[False]


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_a_budget_judges_the_product_as_a_candidate(artifacts, calib_file, tmp_path, arch):
    """With --ratio the product is one more candidate: the best estimate's plan with each
    query/key pair stored as the product that fits in the bytes that plan gives the pair.
    On planted rank-2 heads it fits at low score error, stays within the budget, is judged,
    and whichever plan wins loads."""
    r = run(app, ["compress", str(artifacts[arch]), "-o", str(tmp_path / "a"), "--calib",
                  str(calib_file), *FAST, "--ratio", "0.3", "--attention-product"])
    assert r.exit_code == 0, r.output
    m = _manifest(tmp_path / "a")
    judged = {c["plan"]: c for c in m["budget"]["candidates"]}
    product = [k for k in judged if k.endswith("+ attention product")]
    assert len(product) == 1 and judged[product[0]]["calibration_loss"] is not None
    base = product[0].removesuffix(" + attention product")
    assert base in judged and judged[product[0]]["bytes"] < judged[base]["bytes"]  # it is in
    assert m["totals"]["target_bytes"] <= m["budget"]["requested_bytes"]
    if m["budget"]["plan"] == product[0]:
        rows = [p for p in m["layers"] if p.get("rows")]
        assert rows and all(p["attention_product"]["score_error"] < 0.05 for p in rows)
    x = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = runtime.load(tmp_path / "a")(input_ids=x)
    assert torch.isfinite(out.logits if arch == "gpt2" else out.last_hidden_state).all()


def test_the_product_fits_in_the_room_it_is_given(artifacts, calib_file):
    """`fit_block` keeps each pair within the bytes it is given (the most rows that fit, at
    the lower score error of 4 and 8 bits)."""
    from svdq.config import Settings
    from svdq.models import load as hf
    from svdq.models.attention import heads
    from svdq.pipeline import product as products
    from svdq.pipeline.inputs import calibration_ids
    from svdq.pipeline.walk import Walker
    from svdq.pipeline.work import Clock

    source = hf.load_source(str(artifacts["bert"]))
    settings = Settings(eps=0.1, calib=str(calib_file), calib_samples=4, calib_len=32,
                        batch_size=4)
    ids = calibration_ids(source, settings, lambda *a: None, {})
    walker = Walker(source, settings, lambda *a: None, Clock())
    walker.start(ids)
    works = walker.enter(0)
    q, k = (w for w in works if w.name.endswith(("query", "key")))
    from svdq.pipeline.forms import realize

    grids = set()
    for room in (150, 300, 600, 2000, 10 ** 6):
        got = products.fit_block(works, heads(walker.model), {q.name: room, k.name: room},
                                 settings)
        if not got:
            continue
        stored = [got[q.name][0], got[k.name][0]]
        assert sum(s.nbytes() for s in stored) <= 2 * room
        grids.add((stored[0].weight.bits, stored[0].weight.grid))
        for work, form in zip((q, k), stored):  # the module computes the stored rows
            module = realize(work, form, settings)[2]
            x = torch.randn(3, work.w.shape[1])
            with torch.no_grad():
                expected = x @ form.dequantize().T + (0 if form.bias is None else form.bias)
                torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4)
    assert len(grids) > 1  # tight rooms take the integer grid's few bits, ample ones more
    # with room for every row the rank-2 heads are served to 8-bit rounding noise
    assert got[q.name][1]["attention_product"]["score_error"] < 0.05


def test_refit_refits_the_other_layers_and_keeps_the_product(artifacts, calib_file, tmp_path):
    """--sequential --refit with the product: the product's rows are chosen on the scores and
    kept as they are; the other factored layers are refit against the source's outputs."""
    r = run(app, ["compress", str(artifacts["bert"]), "-o", str(tmp_path / "a"), "--calib",
                  str(calib_file), *FAST, "--eps", "0.05", "--attention-product",
                  "--sequential", "--refit"])
    assert r.exit_code == 0, r.output
    layers = _manifest(tmp_path / "a")["layers"]
    product = [p for p in layers if p.get("rows")]
    assert product and not any("refit" in p for p in product)
    assert all("refit" in p and "source_error" in p for p in layers if not p.get("rows"))
    x = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(runtime.load(tmp_path / "a")(input_ids=x).last_hidden_state).all()
