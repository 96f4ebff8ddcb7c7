"""GGUF sources, converted once into a safetensors folder under svdq's cache, one tensor at a
time, so that a GGUF model streams block by block like any other.

Each tensor is read from the memory-mapped file, de-quantized (gguf's own de-quantizer) and
renamed and reshaped exactly as transformers does when it loads the whole file (its name map
and per-architecture tensor processors, e.g. Llama's q/k permutation), then handed to the
tensor writer; nothing holds more than one tensor in float32. The folder is named by the
file's sha256, written under a temporary name and renamed when complete, and reused by every
later run on the same file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

from svdq.errors import SvdqError

CACHE_VERSION = 1  # bump when the conversion changes: older folders are then not reused


def cache_root() -> Path:
    from svdq.assets import cache_dir

    return cache_dir() / "gguf"


def cached(path: Path, digest: str) -> Path:
    """The cache folder of GGUF file `path` whose sha256 is `digest`."""
    return cache_root() / f"{path.stem}-{digest[:16]}-v{CACHE_VERSION}"


UNQUANTIZED = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}


def quantized(path: Path) -> bool:
    """Does GGUF file `path` hold quantized tensors (which transformers de-quantizes to
    float32)? A file of float tensors alone says its model's dtype itself."""
    from gguf import GGUFReader

    return any(t.tensor_type.name not in UNQUANTIZED for t in GGUFReader(str(path)).tensors)


def ready(folder: Path) -> bool:
    return (folder / "svdq-gguf.json").is_file()


def convert(path: Path, digest: str, model_class: type, config, tokenizer,
            report: Callable[[str, int, int], None] | None = None) -> Path:
    """The safetensors folder of GGUF file `path` (converted now unless cached already)."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map,
                                                          load_gguf_checkpoint, read_field)

    from svdq.artifact import SHARD_BYTES, outdir
    from svdq.artifact.writer import TensorWriter

    dest = cached(path, digest)
    if ready(dest):
        return dest
    report = report or (lambda stage, done, total: None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(path))
    needed = sum(4 * int(t.n_elements) for t in reader.tensors)
    outdir.check_space(dest.parent, needed + (16 << 20))
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = load_gguf_checkpoint(str(path), return_tensors=False)  # metadata only
            with init_empty_weights():
                skeleton = model_class._from_config(config)
        architecture = read_field(reader, "general.architecture")[0]
        processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
        names = get_gguf_hf_weights_map(skeleton, processor)
        writer = TensorWriter(tmp, SHARD_BYTES)
        stage = f"converting {path.name} to safetensors (once)"
        for i, tensor in enumerate(reader.tensors):
            report(stage, i, len(reader.tensors))
            weights = dequantize(tensor.data, tensor.tensor_type)
            result = processor.process(weights=weights, name=tensor.name,
                                       tensor_key_mapping=names, parsed_parameters=parsed)
            if result.name in names:
                writer.add({names[result.name]: torch.from_numpy(result.weights.copy())})
        files = writer.close()
        report(stage, len(reader.tensors), len(reader.tensors))
        saved = config.to_dict()
        saved.pop("quantization_config", None)  # the cache holds plain weights
        saved["architectures"] = [type(skeleton).__name__]
        (tmp / "config.json").write_text(json.dumps(saved, indent=2))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "svdq-gguf.json").write_text(json.dumps(
            {"source": str(path.resolve()), "sha256": digest, "version": CACHE_VERSION,
             "files": files}, indent=1))
        outdir.publish_modes(tmp)
        if dest.exists():  # another run converted it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (ValueError, KeyError, NotImplementedError)):
            raise SvdqError(f"cannot convert {path.name} tensor by tensor ({e}); pass "
                            "--no-stream to load it whole") from None
        raise
    return dest
