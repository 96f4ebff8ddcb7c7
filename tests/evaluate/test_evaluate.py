"""svdq.evaluate and `svdq eval`: sliding-window perplexity against a hand-computed reference,
window bookkeeping, batching, similarity, and the command's output and one-line errors."""
from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch
import transformers
from typer.testing import CliRunner

from svdq import evaluate as ev
from svdq.cli import app
from svdq.errors import SvdqError

from conftest import make_text, one_line_error

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def lm(models):
    model = transformers.AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(models["llama"])
    return model, tok


def ids_of(tok, n_words: int, seed: int = 1) -> torch.Tensor:
    return ev.tokenize(tok, make_text(n_words, seed), 0)


def reference_nll(model, ids: torch.Tensor, context: int) -> list[float]:
    """NLL of every token but the first, each predicted from up to `context` tokens before it,
    one forward pass per token: independent of svdq's windows and batching."""
    out = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            x = ids[max(0, t - context): t].unsqueeze(0)
            logp = torch.log_softmax(model(input_ids=x).logits[0, -1].double(), dim=-1)
            out.append(-logp[ids[t]].item())
    return out


def test_ppl_equals_hand_computed_cross_entropy(lm):
    model, tok = lm
    ids = ids_of(tok, 40)
    res = ev.perplexity(model, ids, ctx=64)  # one window holds the whole text
    ref = reference_nll(model, ids, 64)
    assert res["tokens_scored"] == len(ids) - 1 == len(ref)
    assert res["ppl"] == pytest.approx(math.exp(sum(ref) / len(ref)), rel=1e-5)
    assert {"ppl", "nll", "tokens_scored", "seconds", "tokens_per_s"} <= set(res)


def test_exactly_one_window_equals_a_single_full_window(lm):
    model, tok = lm
    ids = ids_of(tok, 200)[:32]
    windowed = ev.perplexity(model, ids, ctx=32, stride=32)
    assert windowed["windows"] == 1 and windowed["tokens_scored"] == 31
    with torch.no_grad():  # the model's own loss over one full window
        loss = model(input_ids=ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss.item()
    assert windowed["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_overlapping_windows_score_every_token_but_the_first_once(lm):
    model, tok = lm
    n, ctx = 40, 12
    ids = ids_of(tok, 200)[:n]
    assert ev.windows(n, ctx, 1)[1] == (1, 13, 12)  # window 1 scores only token 12
    for stride in (1, 5, 7, 12):
        plan = ev.windows(n, ctx, stride)
        scored = [t for _, e, f in plan for t in range(f, e)]
        assert len(scored) == len(set(scored))  # never twice
        if stride < ctx:
            assert sorted(scored) == list(range(1, n))
        else:  # stride == ctx: each window's first token has no context inside it
            assert len(scored) == n - len(plan)
    # stride 1: token t is predicted from the ctx-1 tokens before it (all of them for t < ctx)
    slid = ev.perplexity(model, ids, ctx=ctx, stride=1, batch_size=8)
    ref = reference_nll(model, ids, ctx - 1)
    assert slid["tokens_scored"] == n - 1
    assert slid["nll"] == pytest.approx(sum(ref) / len(ref), rel=1e-5)
    # no overlap scores fewer tokens, with less context: close, but not the same number
    flat = ev.perplexity(model, ids, ctx=ctx, stride=ctx)
    assert flat["tokens_scored"] == n - math.ceil(n / ctx)
    assert flat["ppl"] != slid["ppl"]
    assert flat["ppl"] == pytest.approx(slid["ppl"], rel=0.2)


def test_text_shorter_than_one_window(lm):
    model, tok = lm
    ids = ids_of(tok, 10)
    res = ev.perplexity(model, ids)  # default ctx: the model's 128 positions
    assert res["ctx"] == 128 and res["windows"] == 1 and res["tokens_scored"] == len(ids) - 1
    ref = reference_nll(model, ids, 128)
    assert res["ppl"] == pytest.approx(math.exp(sum(ref) / len(ref)), rel=1e-5)


def test_batch_size_does_not_change_the_result(lm):
    model, tok = lm
    ids = ids_of(tok, 400)[:130]  # 5 full windows and a short last one
    one = ev.perplexity(model, ids, ctx=32, stride=24, batch_size=1)
    three = ev.perplexity(model, ids, ctx=32, stride=24, batch_size=3)
    assert one["tokens_scored"] == three["tokens_scored"] == 129
    assert one["windows"] == 6
    assert three["ppl"] == pytest.approx(one["ppl"], rel=1e-6)
    again = ev.perplexity(model, ids, ctx=32, stride=24, batch_size=1)
    assert again["ppl"] == one["ppl"]  # reproducible to the bit


def test_bad_windows_are_refused(lm):
    model, tok = lm
    ids = ids_of(tok, 50)
    for kwargs, words in [({"ctx": 256}, "exceeds the model's context of 128"),
                          ({"ctx": 32, "stride": 33}, "--stride must lie in"),
                          ({"ctx": 32, "stride": -1}, "--stride must lie in")]:
        with pytest.raises(SvdqError, match=words):
            ev.perplexity(model, ids, **kwargs)
    with pytest.raises(SvdqError, match="at least 2"):
        ev.perplexity(model, ids[:1])


def test_similarity_of_a_model_with_itself_is_one(models):
    model = transformers.AutoModel.from_pretrained(models["bert"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(models["bert"])
    lines = [make_text(n, seed=n) for n in (3, 9, 20, 5, 14)]
    res = ev.similarity(model, model, tok, lines, batch_size=2)
    assert res["n"] == 5 and res["mean"] >= 1 - 1e-6 and res["min"] >= 1 - 1e-6
    torch.manual_seed(1)  # make_model drew the saved weights after seed 0
    other = transformers.AutoModel.from_config(model.config)  # other random weights
    assert ev.similarity(model, other.eval(), tok, lines)["mean"] < 0.999


# ----------------------------------------------------------------------------- the command
def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def artifact(models, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "llama-out"
    result = run("compress", models["llama"], "-o", out, "--eps", "0.2", "--calib", calib_file,
                 "--calib-samples", "4", "--calib-len", "32", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("evaltext") / "notes.txt"
    path.write_text(make_text(300, seed=5))
    return path


def test_eval_artifact_with_baseline_json(artifact, text_file, models):
    args = ("eval", artifact, "--ppl", text_file, "--baseline", "--ctx", "64", "--json")
    result = run(*args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    ppl = report["ppl"]
    assert [r["name"] for r in ppl["rows"]] == ["artifact", "baseline"]
    assert ppl["rows"][1]["id"] == str(models["llama"])
    assert ppl["rows"][0]["tokens_scored"] == ppl["rows"][1]["tokens_scored"] == 300 - 5
    a, b = ppl["rows"][0]["ppl"], ppl["rows"][1]["ppl"]
    assert ppl["difference"]["ppl"] == pytest.approx(a - b)
    assert a != b and a == pytest.approx(b, rel=0.5)  # eps 0.2: changed, not broken
    assert 0 < report["size"]["ratio_fp16"] < 2
    assert json.loads(run(*args).stdout)["ppl"]["rows"][0]["ppl"] == a  # reproducible
    # the baseline row is the source model measured directly
    direct = json.loads(run("eval", models["llama"], "--ppl", text_file, "--ctx", "64",
                            "--json").stdout)
    assert direct["ppl"]["rows"][0]["ppl"] == pytest.approx(b, rel=1e-9)
    assert direct["artifact"] is False and direct["size"] is None


def test_eval_table_and_similarity(artifact, text_file, monkeypatch):
    from svdq import cli

    monkeypatch.setattr(cli.out, "_width", 200)
    result = run("eval", artifact, "--ppl", text_file, "--baseline", "--similarity", text_file)
    assert result.exit_code == 0, result.output
    for words in ("perplexity on", "artifact", "baseline", "difference", "similarity to"):
        assert words in result.stdout
    sim = json.loads(run("eval", artifact, "--similarity", text_file, "--json").stdout)
    assert sim["ppl"] is None and 0.5 < sim["similarity"]["mean"] <= 1 + 1e-9


def test_eval_bad_inputs(artifact, text_file, models, tmp_path, monkeypatch):
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("  \n")
    short.write_text("the")
    cases = [
        (["--ppl", tmp_path / "missing.txt"], "does not exist"),
        (["--ppl", empty], "is empty"),
        (["--ppl", text_file, "--ctx", "4096"], "exceeds the model's context"),
        (["--ppl", text_file, "--stride", "0"], "--stride must be at least 1"),
        (["--ppl", text_file, "--ctx", "32", "--stride", "64"], "exceeds --ctx"),
        (["--ppl", text_file, "--stride", "200"], "--stride must lie in"),
        ([], "nothing to measure"),
        (["--ppl", short], "needs at least 2"),
        (["--ppl", text_file, "--max-tokens", "-3"], "--max-tokens"),
        (["--ppl", text_file, "--batch-size", "0"], "--batch-size"),
        (["--ppl", text_file, "--device", "tpu"], "--device"),
    ]
    for extra, words in cases:
        assert words in one_line_error(run("eval", artifact, *extra)), extra
    assert "not an svdq artifact" in one_line_error(
        run("eval", models["llama"], "--ppl", text_file, "--baseline"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    assert "--ppl FILE" in one_line_error(run("eval", artifact, "--ppl", "wikitext"))


def test_cli_default_matches_the_library():
    from svdq.cli import eval_

    import inspect
    assert inspect.signature(eval_).parameters["max_tokens"].default.default == ev.DEFAULT_MAX_TOKENS
