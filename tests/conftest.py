"""Shared fixtures: tiny models built from configs, a word-level tokenizer, calibration text.

Nothing here touches the network: HF_HUB_OFFLINE is set before transformers is imported.
"""
from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random
import re
from pathlib import Path

import pytest
import torch
import transformers

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from "
         "at which but have an they you were her she there one all we their can has been if "
         "more when will would who so no model layer rank error weight matrix low data text "
         "small large value input output train test left right first last time year day").split()


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="</s>")
    tok.save_pretrained(folder)
    return tok


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    # a little structure (bigram habits) so models and statistics are not pure noise
    out, prev = [], 0
    for _ in range(n_words):
        prev = (prev + rng.choice((1, 2, 3, 7))) % len(WORDS) if rng.random() < 0.7 else rng.randrange(len(WORDS))
        out.append(WORDS[prev])
    return " ".join(out)


def tiny_config(arch: str, vocab: int):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab, n_positions=128,
                          bos_token_id=1, eos_token_id=2, architectures=["GPT2LMHeadModel"])
    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                           max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    if arch == "bert":
        return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=160, vocab_size=vocab, max_position_embeddings=128,
                          architectures=["BertModel"])
    raise ValueError(arch)


def make_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """A tiny model of `arch` with random weights saved with its tokenizer into `folder`."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    config = tiny_config(arch, len(tok))
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config)
    model.save_pretrained(folder)
    return folder


VISION = ("vit", "resnet", "convnext")


def make_vision_model(arch: str, folder: Path, seed: int = 0, rank: int = 3) -> Path:
    """A tiny 1-channel 28×28 image classifier of `arch` (3 classes) saved with its image
    processor; every other target layer inside the blocks gets a weight of exact rank `rank`
    (plus a little noise), so low rank pays there and not elsewhere."""
    import transformers as T

    from svdq.models.layers import targets, weight_of

    configs = {
        "vit": T.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32,
                           num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           num_labels=3, architectures=["ViTForImageClassification"]),
        "resnet": T.ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32],
                                 depths=[1, 1], layer_type="basic", num_labels=3,
                                 architectures=["ResNetForImageClassification"]),
        "convnext": T.ConvNextConfig(num_channels=1, patch_size=2, hidden_sizes=[16, 32],
                                     depths=[1, 1], num_stages=2, num_labels=3,
                                     architectures=["ConvNextForImageClassification"]),
    }
    config = configs[arch]
    config.id2label = {0: "shirt", 1: "shoe", 2: "bag"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(seed)
    model = getattr(T, config.architectures[0])(config).eval()
    with torch.no_grad():
        for i, name in enumerate(targets(model)):
            module = model.get_submodule(name)
            w = weight_of(module)
            if i % 2 == 0 and min(w.shape) > rank:
                low = torch.randn(w.shape[0], rank) @ torch.randn(rank, w.shape[1]) / w.shape[1]
                low += 1e-3 * low.std() * torch.randn_like(low)
                module.weight.copy_(low.reshape(module.weight.shape))
    model.save_pretrained(folder)
    T.ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.5],
                        image_std=[0.5]).save_pretrained(folder)
    return folder


def make_images(folder: Path, per_class: int = 6, seed: int = 0) -> Path:
    """A class-folder tree of random 28×28 grey PNGs, one sub-folder per label of the tiny
    vision models (`shirt`, `shoe`, `bag`), with a little structure per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, label in enumerate(("shirt", "shoe", "bag")):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.random((28, 28)) * 128
            pixels[:, 9 * c: 9 * c + 9] += 120  # a bright band whose place is the class
            Image.fromarray(pixels.clip(0, 255).astype("uint8"), "L").save(folder / label / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def vision_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision")
    return {arch: make_vision_model(arch, root / arch) for arch in VISION}


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from threads, and a busy machine makes threads wait on each
    other (on a loaded 2-core box two threads made tiny ops 10x slower): run every test's torch
    work on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model(arch, root / arch) for arch in ("gpt2", "llama", "bert")}


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(make_text(20000))
    return path


@pytest.fixture(scope="session")
def built(models, calib_file, tmp_path_factory):
    """built(arch, eps, bits) -> compressed.Built: each combination compressed and saved once a
    session (tests/compressed.py), for the end-to-end and strict-loading tests."""
    from compressed import Builder

    return Builder(models, calib_file, tmp_path_factory.mktemp("artifacts"))


def planted(arch: str, folder, rank: int = 2):
    """A tiny model whose heads' queries and keys have `rank` rows' worth each (so W_Q,hᵀ W_K,h
    has rank ≤ `rank`), biases random."""
    make_model(arch, folder)
    model = getattr(transformers, {"bert": "BertModel", "gpt2": "GPT2LMHeadModel"}[arch]
                    ).from_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    n, heads = model.config.hidden_size, model.config.num_attention_heads
    d = n // heads

    def low():
        return torch.cat([torch.randn(d, rank, generator=g) @ torch.randn(rank, n, generator=g)
                          / n ** 0.5 for _ in range(heads)])
    with torch.no_grad():
        for block in (model.encoder.layer if arch == "bert" else model.transformer.h):
            if arch == "bert":
                for lin in (block.attention.self.query, block.attention.self.key):
                    lin.weight.copy_(low())
                    lin.bias.normal_(0, 0.3, generator=g)
            else:
                block.attn.c_attn.weight[:, :n] = low().T
                block.attn.c_attn.weight[:, n:2 * n] = low().T
                block.attn.c_attn.bias.normal_(0, 0.3, generator=g)
    model.save_pretrained(folder)
    return folder


FAST = ["--calib-samples", "4", "--calib-len", "32", "--batch-size", "4"]


def compress_all(models: dict[str, Path], calib_file: Path, root: Path,
                 cases: dict[str, list[str]]) -> dict[str, Path]:
    """{arch: artifact folder}: each tiny model compressed by the CLI with its case's options
    (on the short calibration of FAST), for a test module's artifacts fixture."""
    from typer.testing import CliRunner

    from svdq.cli import app

    for arch, extra in cases.items():
        r = CliRunner().invoke(app, ["compress", str(models[arch]), "-o", str(root / arch),
                                     "--calib", str(calib_file), *FAST, *extra])
        assert r.exit_code == 0, r.output
    return {arch: root / arch for arch in cases}


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def one_line_error(result, quiet_stdout: bool = False) -> str:
    """The stderr of a CLI run that must fail with one 'error: …' line and no traceback."""
    stderr = ANSI.sub("", result.stderr).strip()
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert "Traceback" not in result.output
    if quiet_stdout:
        assert result.stdout == ""
    return stderr


def as_format(folder: Path, version: int, checksum: bool = True) -> dict:
    """Rewrite a one-file artifact as svdq format `version` wrote it: before 5, a quantized
    weight under NAME.weight.* and no empty NAME.weight marker; the manifest's tensor checksum
    updated and (with `checksum`, as from version 3) its own re-sealed."""
    import json

    from safetensors.torch import load_file, save_file

    from svdq import runtime

    path = folder / runtime.TENSORS
    tensors = load_file(path)
    if version < 5:
        tensors = {k.replace(".svdq.weight", ".weight"): v for k, v in tensors.items()
                   if not (k.endswith(".weight") and v.numel() == 0 and v.dtype == torch.uint8)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    manifest = json.loads((folder / runtime.MANIFEST).read_text())
    manifest["format_version"], manifest["sha256"] = version, runtime.sha256(path)
    manifest.pop("manifest_sha256", None)
    if checksum:
        manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    (folder / runtime.MANIFEST).write_text(json.dumps(manifest))
    return manifest


@pytest.fixture(scope="session")
def spiky(tmp_path_factory) -> dict:
    """Tiny GPT-2 and Llama whose block layers are rank 3 plus 1% large spikes: where a
    sparse term pays (truncation alone spends a rank on each spike)."""
    from svdq.models.layers import targets, weight_of

    root, out = tmp_path_factory.mktemp("spiky"), {}
    for arch in ("gpt2", "llama"):
        folder = make_model(arch, root / arch)
        model = getattr(transformers, json.loads((folder / "config.json").read_text())
                        ["architectures"][0]).from_pretrained(folder)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name in targets(model):
                m = model.get_submodule(name)
                o, i = weight_of(m).shape
                w = torch.randn(o, 3, generator=g) @ torch.randn(3, i, generator=g) / i ** 0.5
                spikes = torch.randperm(o * i, generator=g)[: o * i // 100]
                w.view(-1)[spikes] += 3 * torch.randn(len(spikes), generator=g).sign()
                m.weight.copy_(w.T if m.weight.shape != w.shape else w)
        model.save_pretrained(folder)
        out[arch] = folder
    return out
