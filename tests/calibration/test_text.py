"""Calibration text (svdq/calibration/text.py): the preflight's tokens are the calibration's."""
from __future__ import annotations

import pytest
import torch

from svdq.calibration import text as calibrate
from svdq.errors import SvdqError


class Counting:
    """A tokenizer wrapper that counts how often it tokenizes."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)


def test_the_checked_text_is_tokenized_once(models, calib_file, tmp_path):
    from transformers import AutoTokenizer
    tok = Counting(AutoTokenizer.from_pretrained(models["llama"]))
    text = calibrate.check_file(calib_file)
    calibrate.check_length(tok, text, 4, 16, "calib")
    ids, _ = calibrate.calibration_ids(None, tok, str(calib_file), 4, 16, 2, 0, True)
    assert tok.calls == 1 and ids.shape == (4, 16)
    again, _ = calibrate.calibration_ids(None, tok, str(calib_file), 4, 16, 2, 0, True)
    assert tok.calls == 2 and torch.equal(again, ids)  # taken once: the next run tokenizes
    other = tmp_path / "other.txt"
    other.write_text(text + " more")
    calibrate.check_length(tok, text, 4, 16, "calib")
    calibrate.calibration_ids(None, tok, str(other), 4, 16, 2, 0, True)
    assert tok.calls == 4  # another text: tokenized itself
    with pytest.raises(SvdqError, match="too short"):
        calibrate.check_length(tok, "the model", 4, 16, "calib")
