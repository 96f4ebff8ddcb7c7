"""Progress where stderr is not a terminal: plain lines for logs, throttled, never on stdout."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from svdq import cli
from svdq.cli import app, progress_bar

FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4"]


def test_lines_go_to_stderr_at_most_once_a_period(capsys, monkeypatch):
    now = [1000.0]  # a clock the test moves
    monkeypatch.setattr(cli.time, "monotonic", lambda: now[0])
    bar, progress = progress_bar()
    with bar:
        for t, stage, done in [(30, "fine-tuning: loss 0.5", 1),  # within the first minute
                               (61, "fine-tuning: loss 0.1234", 3),
                               (90, "fine-tuning: loss 0.2", 4),  # within a minute of the last
                               (122, "blocks: block 2: q_proj", 2)]:
            now[0] = 1000.0 + t
            progress(stage, done, 120)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert lines == ["svdq 1:01 fine-tuning · loss 0.1234 3/120",
                     "svdq 2:02 blocks · block 2: q_proj 2/120"], captured.err


def test_a_quick_run_writes_no_progress_line(capsys):
    assert cli.LOG_EVERY >= 30  # the default: a line a minute, none in the first minute
    bar, progress = progress_bar()
    with bar:
        for step in range(50):
            progress("fine-tuning: loss 1.0", step, 50)
    assert capsys.readouterr().err.strip() == ""  # (rich ends its silent bar with a newline)


def test_json_stdout_stays_one_document_with_progress_lines(models, calib_file, tmp_path,
                                                            monkeypatch):
    monkeypatch.setattr(cli, "LOG_EVERY", 0.0)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(models["gpt2"]), "-o", str(out),
                                      "--eps", "0.3", "--bits", "8", "--calib", str(calib_file),
                                      *FAST, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == str(out)
    assert "svdq 0:" in result.stderr  # the log lines went to stderr
