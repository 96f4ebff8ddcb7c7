"""`transformers.AutoModel*.from_pretrained` on an svdq artifact.

An artifact's `config.json` carries `quantization_config = {"quant_method": "svdq", …}` with
the plan of its target layers (`quantization_config`). Importing svdq registers a config class
and a quantizer under that name (`register`), so `from_pretrained` builds the skeleton empty,
the quantizer swaps each target layer for an empty `runtime.StoredLinear` of its plan before
the weights are read, transformers fills them from the safetensors by name, and the quantizer
checks that every tensor of theirs came from the checkpoint and nothing of theirs was left
over. The layers stay as stored in memory, as `svdq.load` keeps them.

Without svdq, transformers only warns about an unknown quantization method; what makes such a
load fail is the artifact itself: every layer svdq replaced stores an empty `NAME.weight`,
whose shape a plain layer refuses (`runtime.marked`).
"""
from __future__ import annotations

from svdq import runtime

QUANT_METHOD = "svdq"
# what a StoredLinear is built from: the rest of a plan entry (errors, bytes) stays in svdq.json
PLAN_FIELDS = ("name", "kind", "bits", "factor_bits", "rank", "block_size", "grid",
               "out_features", "in_features", "bias", "sparse_nnz", "rows", "lookup")


def quantization_config(layers: list[dict], version: int = runtime.FORMAT_VERSION) -> dict:
    """The `quantization_config` of an artifact's config.json for plan `layers`, written as
    format `version`."""
    return {"quant_method": QUANT_METHOD, "format_version": version,
            "layers": [{k: p[k] for k in PLAN_FIELDS if k in p} for p in layers]}


def _stored_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, runtime.StoredLinear)]


def _untie(model, layers: list) -> None:
    """A quantized embedding's tied heads multiply by its codes (`runtime.TiedHead`): take them
    out of transformers' weight tying, which would assign the embedding's marker to them."""
    taken = {n for p in layers if p.get("lookup") is not None for n in (p["name"], *p["lookup"])}
    tied = getattr(model, "all_tied_weights_keys", None)
    if taken and isinstance(tied, dict):
        for target, source in list(tied.items()):
            if target.rpartition(".")[0] in taken or source.rpartition(".")[0] in taken:
                tied.pop(target)


def register() -> None:
    """Register svdq's quantization config and quantizer with transformers (once)."""
    from transformers.quantizers import (HfQuantizer, register_quantization_config,
                                         register_quantizer)
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return

    @register_quantization_config(QUANT_METHOD)
    class SvdqConfig(QuantizationConfigMixin):
        """The plan of an artifact's target layers and its format version."""

        def __init__(self, layers=(), format_version=runtime.FORMAT_VERSION, **kwargs):
            self.quant_method = QUANT_METHOD
            self.layers, self.format_version = list(layers), format_version
            for key, value in kwargs.items():
                if key != "quant_method":
                    setattr(self, key, value)

    @register_quantizer(QUANT_METHOD)
    class SvdqQuantizer(HfQuantizer):
        """Loads svdq artifacts as they are stored; it makes none (`svdq compress` does)."""

        requires_calibration = True  # pre-quantized checkpoints only

        def validate_environment(self, *args, **kwargs) -> None:
            version = self.quantization_config.format_version
            if version not in runtime.READS:
                raise ValueError(f"this svdq artifact has format version {version}, the "
                                 f"installed svdq reads {runtime.READS}; upgrade svdq")

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            dtype = next(model.parameters()).dtype
            try:
                runtime.swap_in(model, self.quantization_config.layers, dtype,
                                self.quantization_config.format_version)
            except runtime.ArtifactError as e:
                raise ValueError(str(e)) from None
            _untie(model, self.quantization_config.layers)
            if checkpoint_files:  # strict before any reading: svdq's tensors, all and only
                from safetensors import safe_open

                stored = set()
                for path in checkpoint_files:
                    with safe_open(path, framework="pt") as f:
                        stored |= set(f.keys())
                mine = tuple(n + "." for n in _stored_names(model)) + ("svdq.",)
                want = {k for k in model.state_dict() if k.startswith(mine)}
                have = {k for k in stored if k.startswith(mine)}
                if want != have:
                    first = sorted(want - have) or sorted(have - want)
                    raise ValueError(f"the svdq artifact is inconsistent: {len(want - have)} "
                                     f"tensors missing and {len(have - want)} unexplained "
                                     f"(first: {first[0]!r}); compress the model again")
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            for name in _stored_names(model):
                module = model.get_submodule(name)
                for key, t in module.state_dict(keep_vars=True).items():
                    if not getattr(t, "_is_hf_initialized", False):
                        raise ValueError(f"{name}.{key} was not read from the svdq artifact; "
                                         "compress the model again")
            return model

        def is_serializable(self, **kwargs) -> bool:
            return False  # save_pretrained refuses: an artifact is written by `svdq compress`

        @property
        def is_trainable(self) -> bool:
            return False
