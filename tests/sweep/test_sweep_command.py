"""`svdq sweep`: the files it writes (CSV, JSON, plot), the similarity protocol, its rows
against `compress` for the residual, budget and sparse kinds, method defaults, and one-line
errors for bad input. The library beneath: tests/sweep/test_sweep.py."""
from __future__ import annotations

import csv
import json
import re
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from svdq import artifact, sweep
from svdq.cli import app
from svdq.models import load as hf
from svdq.pipeline.compress import compress
from svdq.config import Settings

from conftest import make_text, one_line_error
from sweep_rows import CALIB, CALIB_ARGS, CTX, EVAL_TEXT, expected_bytes, row_of

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweeptext") / "eval.txt"
    path.write_text(EVAL_TEXT)
    return path


def sweep_args(model, out, calib_file, *extra):
    return ["sweep", model, "-o", out, "--calib", calib_file, *CALIB_ARGS, *extra]


def test_cli_writes_results_csv_and_plot(models, calib_file, text_file, tmp_path, monkeypatch):
    from svdq import cli

    monkeypatch.setattr(cli.out, "_width", 250)
    out = tmp_path / "out"
    args = ("--eps", "0.05,0.38", "--bits", "4,8", "--ppl", text_file, "--ctx", CTX)
    result = run(*sweep_args(models["llama"], out, calib_file, *args))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["frontier.png", "results.csv", "results.json"]
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert len(rows) == 4 + 4  # source, fp16, nf4, 8-bit; 2 eps × 2 bits
    assert results["metric"] == "perplexity" and results["evaluation"]["ctx"] == CTX
    with open(out / "results.csv", newline="") as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 + len(rows)
    assert lines[0].split(",") == sweep.results.COLUMNS
    table = list(csv.DictReader(lines))
    assert [(t["method"], t["target_bytes"], t["quality"]) for t in table] == \
           [(r["method"], str(r["target_bytes"]), str(r["quality"])) for r in rows]
    png = (out / "frontier.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    from PIL import Image
    with Image.open(out / "frontier.png") as im:
        im.verify()
    text = ANSI.sub("", result.stdout)
    assert "wrote" in text and str(out / "frontier.png") in text
    assert sum(line.lstrip("│ ").startswith(("source", "fp16", "bnb-", "svd"))
               for line in text.splitlines()) == len(rows)

    again = run(*sweep_args(models["llama"], tmp_path / "json", calib_file, *args, "--json"))
    assert again.exit_code == 0, again.output
    data = json.loads(again.stdout)  # stdout is the JSON and nothing else
    same = ("method", "bits", "eps", "target_bytes", "quality", "lowrank_layers", "pareto")
    assert [[r[k] for k in same] for r in data["rows"]] == [[r[k] for k in same] for r in rows]
    assert json.loads((tmp_path / "json" / "results.json").read_text())["rows"] == data["rows"]


def test_cli_similarity_on_bert(models, calib_file, tmp_path):
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(make_text(n, seed=n) for n in range(4, 16)) + "\n")
    out = tmp_path / "out"
    result = run(*sweep_args(models["bert"], out, calib_file, "--eps", "0.05,0.2", "--bits",
                             "4,8", "--similarity", sentences, "--json"))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = data["rows"]
    assert data["metric"] == "similarity" and data["evaluation"]["lines"] == 12
    assert row_of(rows, "source", None, None)["quality"] == pytest.approx(1, abs=1e-12)
    fp16 = row_of(rows, "fp16", 16, None)["quality"]
    nf4 = row_of(rows, "bnb-nf4", 4, None)["quality"]
    assert fp16 >= 0.999
    assert nf4 < fp16  # coarser weights, less similar: the rows are different models
    assert all(r["quality"] <= 1 + 1e-9 for r in rows)
    # higher is better: the most similar row is on the frontier
    assert max(rows, key=lambda r: r["quality"])["pareto"]
    model = hf.load_source(str(models["bert"])).model  # with biases: they count too
    for how, bits in (("source", None), ("fp16", 16), ("bnb-8bit", 8), ("bnb-nf4", 4)):
        assert row_of(rows, how, bits, None)["target_bytes"] == expected_bytes(model, how), how


def run_recording(*args, **kwargs) -> tuple[dict, list[list[dict]]]:
    """`sweep.run`, and the per-layer plans of every variant it built, in order."""
    plans: list[list[dict]] = []
    real_variant = sweep._variant

    def recording(model, works, choices, settings_):
        variant, layer_plans = real_variant(model, works, choices, settings_)
        plans.append(layer_plans)
        return variant, layer_plans

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep, "_variant", recording)
        return sweep.run(*args, **kwargs), plans


def test_residual_and_budget_rows_match_compress(models, calib_file, tmp_path):
    """`--residual` and `--ratio` rows are the models `compress --residual` / `--ratio` build:
    the same per-layer plans and bytes; the budget rows fit their budgets, and the baseline
    in larger blocks is there to compare against."""
    source = hf.load_source(str(models["llama"]))
    settings = Settings(eps=0.05, bits=4, method="whiten", calib=str(calib_file), **CALIB)
    measure, metric = sweep.evaluator(source, (EVAL_TEXT, "eval"), None, CTX, None, 0, 1)
    results, plans = run_recording(source, settings, [0.05], [4], measure, metric,
                                   residual=True, ratios=[0.3, 0.45])
    rows = results["rows"]
    by_row = {(r["method"], r["bits"], r["eps"], r["ratio"]): p for r, p in zip(rows[1:], plans)}
    assert set(by_row) == {("fp16", 16, None, None), ("bnb-nf4", 4, None, None),
                           ("bnb-nf4-b256", 4, None, None), ("gptq-int2-g64", 2, None, None),
                           ("gptq-int3-g64", 3, None, None), ("gptq-int3-g128", 3, None, None),
                           ("gptq-int4-g64", 4, None, None), ("gptq-int4-g128", 4, None, None),
                           ("gptq-int8-g128", 8, None, None), ("whiten", 4, 0.05, None),
                           ("whiten+residual", 4, 0.05, None), ("whiten budget", None, None, 0.3),
                           ("whiten budget", None, None, 0.45)}
    assert {p["block_size"] for p in by_row["bnb-nf4-b256", 4, None, None]} == {256}
    assert {(p["bits"], p["block_size"], p.get("grid")) for p in by_row["gptq-int3-g128", 3, None, None]} \
        == {(3, 128, "int")}
    fields = ("name", "kind", "rank", "bits", "block_size", "bytes")
    for knob, row_key in ((dict(eps=0.05, residual=True), ("whiten+residual", 4, 0.05, None)),
                          (dict(budget_ratio=0.3), ("whiten budget", None, None, 0.3)),
                          (dict(budget_ratio=0.45), ("whiten budget", None, None, 0.45))):
        fresh = hf.load_source(str(models["llama"]))
        s = Settings(**{**dict(eps=0.05, bits=4, method="whiten", calib=str(calib_file), **CALIB),
                        **knob})
        manifest = artifact.save(tmp_path / str(row_key), fresh, compress(fresh, s), s)
        assert [tuple(p[f] for f in fields) for p in by_row[row_key]] == \
               [tuple(p[f] for f in fields) for p in manifest["layers"]], row_key
    for r in rows:
        if r["ratio"] is not None:
            assert r["target_bytes"] <= r["ratio"] * results["target_fp16_bytes"]
    assert row_of(rows, "whiten+residual", 4, 0.05)["residual_layers"] > 0


def test_rows_with_sparse_terms_match_compress(spiky, calib_file, tmp_path):
    """`sweep --sparse S` rows, eps and budget, are what `compress --sparse S` builds at the
    same settings, sparse terms included, and the rows count the layers that have one; with
    `--no-baselines` the source is the only other row."""
    source = hf.load_source(str(spiky["llama"]))
    settings = Settings(eps=0.05, bits=8, method="svd", calib=str(calib_file), sparse=0.01,
                        **CALIB)
    measure, metric = sweep.evaluator(source, (EVAL_TEXT, "eval"), None, CTX, None, 0, 1)
    results, plans = run_recording(source, settings, [0.05], [8], measure, metric,
                                   methods=["svd"], ratios=[0.3], with_baselines=False)
    rows = results["rows"]
    assert [r["method"] for r in rows] == ["source", "svd", "svd budget"]  # no baselines
    by_row = {(r["eps"], r["ratio"]): (r, p) for r, p in zip(rows[1:], plans)}
    fields = ("name", "kind", "rank", "bits", "block_size", "bytes", "sparse_nnz")
    for key, knob in (((0.05, None), {}), ((None, 0.3), dict(budget_ratio=0.3))):
        row, plan = by_row[key]
        fresh = hf.load_source(str(spiky["llama"]))
        s = replace(settings, **knob)
        manifest = artifact.save(tmp_path / str(key), fresh, compress(fresh, s), s)
        assert [tuple(p.get(f) for f in fields) for p in plan] == \
               [tuple(p.get(f) for f in fields) for p in manifest["layers"]], key
        assert row["sparse_layers"] == sum(bool(p.get("sparse_nnz")) for p in plan)
    assert by_row[0.05, None][0]["sparse_layers"] > 0


BAD = {
    # case: (extra arguments, words expected in the message)
    "neither measure": ([], "exactly one quality measure"),
    "both measures": (["--ppl", "TEXT", "--similarity", "TEXT"], "exactly one quality measure"),
    "eps 0": (["--ppl", "TEXT", "--eps", "0,0.1"], "--eps must lie in (0, 1)"),
    "eps not a number": (["--ppl", "TEXT", "--eps", "a"], "--eps takes comma-separated numbers"),
    "bits 5": (["--ppl", "TEXT", "--bits", "5"], "--bits 5 is not supported"),
    "bits 3 on bnb": (["--ppl", "TEXT", "--bits", "3", "--grid", "bnb"], "with --grid int"),
    "ratio 0": (["--ppl", "TEXT", "--ratio", "0.3,0"], "--ratio must be a positive number"),
    "no eps nor ratio": (["--ppl", "TEXT", "--eps", ""], "--eps or --ratio at least one"),
    "missing text": (["--ppl", "MISSING"], "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD), ids=[c.replace(" ", "-") for c in BAD])
def test_cli_bad_input(case, models, calib_file, text_file, tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    extra, words = BAD[case]
    extra = [{"TEXT": text_file, "MISSING": tmp_path / "missing.txt"}.get(a, a) for a in extra]
    line = one_line_error(run(*sweep_args(models["llama"], parent / "out", calib_file, *extra)),
                          quiet_stdout=True)
    assert words in line, line
    assert list(parent.iterdir()) == []


def test_cli_non_empty_output_needs_overwrite(models, calib_file, text_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = sweep_args(models["llama"], out, calib_file, "--eps", "0.38", "--bits", "8",
                      "--ppl", text_file, "--ctx", CTX)
    line = one_line_error(run(*args), quiet_stdout=True)
    assert "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    result = run(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "results.json").is_file()


def test_sweep_compares_methods_on_one_calibration(models, calib_file, monkeypatch):
    """Every method factorizes every layer exactly once; calibration runs once for all."""
    from svdq import evaluate, sweep
    from svdq.algo import factorize as fz
    from svdq.calibration import text as calibrate
    from svdq.config import Settings

    calls = {"svd": 0, "whiten": 0, "calibration": 0}
    for name in ("svd", "whiten"):
        original = fz.METHODS[name]

        def counted(w, stats, dtype, _name=name, _fn=original):
            calls[_name] += 1
            return _fn(w, stats, dtype)
        monkeypatch.setitem(fz.METHODS, name, counted)
    real_ids = calibrate.calibration_ids

    def counted_ids(*args, **kwargs):
        calls["calibration"] += 1
        return real_ids(*args, **kwargs)
    monkeypatch.setattr(calibrate, "calibration_ids", counted_ids)

    source = hf.load_source(str(models["llama"]))
    ids = evaluate.tokenize(source.tokenizer, calib_file.read_text()[:4000])
    measure = lambda m: {"quality": evaluate.perplexity(m, ids, ctx=64)["ppl"]}  # noqa: E731
    settings = Settings(calib=str(calib_file), calib_samples=4, calib_len=32)
    results = sweep.run(source, settings, [0.3, 0.5], [8], measure, sweep.Metric("perplexity", True),
                        methods=["svd", "whiten"])
    layers = results["rows"][0]["layers"]
    assert calls == {"svd": layers, "whiten": layers, "calibration": 1}
    found = {(r["method"], r["eps"]) for r in results["rows"] if r["eps"] is not None}
    assert found == {(m, e) for m in ("svd", "whiten") for e in (0.3, 0.5)}


@pytest.mark.parametrize("extra, expected", [(("--eps", "0.05"), ["svd"]),
                                             (("--eps", "", "--ratio", "0.3"), ["whiten"]),
                                             (("--eps", "0.05", "--residual"), ["whiten"]),
                                             (("--eps", "0.05", "--method", "svd,fisher"),
                                              ["svd", "fisher"])])
def test_cli_method_defaults_to_what_compress_would_choose(models, calib_file, text_file,
                                                          tmp_path, monkeypatch, extra, expected):
    """Without --method a sweep's budgets and corrections are whitened, as compress's are."""
    seen = {}

    def stop(source, settings, eps_list, bits_list, measure, metric, progress, methods, *rest):
        seen["methods"] = methods
        raise SystemExit(3)
    monkeypatch.setattr(sweep, "run", stop)
    result = run(*sweep_args(models["llama"], tmp_path / "out", calib_file, "--bits", "4",
                             "--ppl", text_file, "--ctx", CTX, *extra))
    assert result.exit_code == 3, result.output
    assert seen["methods"] == expected


def test_sweep_without_matplotlib_refuses_before_loading_unless_told(models, calib_file,
                                                                      text_file, tmp_path,
                                                                      monkeypatch):
    """The plot extra missing: one line naming the fix before any work, or --no-plot writes
    the JSON and CSV alone."""
    import importlib.util

    from svdq.models import load as hf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    loads = []
    monkeypatch.setattr(hf, "load_source", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    args = ("--eps", "0.38", "--bits", "8", "--ppl", text_file, "--ctx", CTX)
    result = run(*sweep_args(models["llama"], tmp_path / "out", calib_file, *args))
    assert "pip install 'svdq[plot]', or pass --no-plot" in one_line_error(result)
    assert not loads
    monkeypatch.undo()
    out = tmp_path / "plain"
    result = run(*sweep_args(models["llama"], out, calib_file, *args, "--no-plot"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json"]
