"""Loading a source (svdq/models/load.py)."""
from __future__ import annotations


def test_the_preflight_tokenizer_is_handed_to_the_load_once(models):
    """`compress` checks the calibration text with the folder's tokenizer before the model
    loads; the load takes that tokenizer instead of loading it again, once."""
    from transformers import LlamaForCausalLM

    from svdq.models import load

    early = load.local_tokenizer(str(models["llama"]))
    assert early is not None
    assert load.preprocessor(LlamaForCausalLM, str(models["llama"]) + "/") is early
    again = load.preprocessor(LlamaForCausalLM, str(models["llama"]))
    assert again is not early and again("the model")["input_ids"] == early("the model")["input_ids"]
    assert load.local_tokenizer(str(models["llama"] / "missing")) is None
