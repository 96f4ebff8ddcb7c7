"""svdq: compress Hugging Face checkpoints with low-rank factors and quantization."""
__version__ = "0.1.0"


def load(path, device: str = "cpu", verify: bool = True, dequantize: bool = False, dtype=None):
    """Load an svdq artifact folder as a ready transformers model (`dtype`: run it in
    float32, float16 or bfloat16 instead of the manifest's dtype)."""
    from svdq.artifact import load as _load

    return _load(path, device=device, verify=verify, dequantize=dequantize, dtype=dtype)


def _register() -> None:
    """Let transformers' `from_pretrained` read svdq artifacts (svdq.artifact.hf_quantizer)."""
    from svdq.artifact.hf_quantizer import register

    register()


_register()

__all__ = ["__version__", "load"]
