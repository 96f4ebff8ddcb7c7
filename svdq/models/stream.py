"""Source streaming: the model skeleton on `meta`, each block's weights read from the source's
safetensors files (memory-mapped) when the walk reaches it, and dropped again once the block
is done, so peak memory is about one block plus the tensors outside the blocks.

`open_source` builds such a Source for a local folder of safetensors files (one file or
shards with an index). The walk calls `materialize` before a block runs and `release` after
its layers are stored; `release` first keeps a copy of what the block leaves untouched (norms,
kept layers), since the artifact needs those tensors and they are about to become `meta`.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from svdq.errors import SvdqError

INDEX = "model.safetensors.index.json"


class Weights:
    """Where each tensor of a safetensors checkpoint lies, and reading some in a dtype. Files
    are opened (memory-mapped) only while a read runs, so their pages leave the process when
    a block is done instead of adding to its resident memory."""

    def __init__(self, folder: Path) -> None:
        index = folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise SvdqError(f"{index} is not a valid safetensors index; re-save the model") from None
            paths = sorted({folder / name for name in weight_map.values()})
        elif (folder / "model.safetensors").is_file():
            weight_map, paths = None, [folder / "model.safetensors"]
        else:
            raise SvdqError(f"{folder} has no model.safetensors or {INDEX}")
        self.files: dict[str, Path] = {}
        self.kinds: dict[str, str] = {}  # key -> stored dtype ("BF16", ...), from the headers
        for path in paths:  # headers only: seconds, before any work
            if not path.is_file():
                raise SvdqError(f"shard {path.name} of {folder} is missing; download the model again")
            with self._open(path) as f:
                for key in f.keys():
                    self.kinds[key] = f.get_slice(key).get_dtype()
                    if weight_map is None or weight_map.get(key) == path.name:
                        self.files[key] = path
        if weight_map is not None and set(weight_map) - set(self.files):
            key = sorted(set(weight_map) - set(self.files))[0]
            raise SvdqError(f"{weight_map[key]} of {folder} lacks {key!r}, which its index places "
                            "there; download the model again")

    @staticmethod
    def _open(path: Path):
        from safetensors import safe_open

        try:
            return safe_open(str(path), "pt")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types
            raise SvdqError(f"cannot read {path.name} ({e}); the shard is damaged: download "
                            "the model again") from None

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, keys: list[str], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        out = {}
        for path in sorted({self.files[k] for k in keys}):
            with self._open(path) as f:
                for key in (k for k in keys if self.files[k] == path):
                    try:
                        t = f.get_tensor(key)
                    except Exception as e:  # noqa: BLE001 - safetensors raises its own types
                        raise SvdqError(f"cannot read {key} from {path.name} ({e}); the shard "
                                        "is damaged: download the model again") from None
                    out[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return out


_LIBC = None  # glibc, once `tame_malloc` has set it up: `give_back` trims through it
MMAP_THRESHOLD = 16 << 20  # above every hot temporary at SmolLM2's shapes (RESULTS.md)


def tame_malloc() -> None:
    """Ask glibc to keep temporaries below 16 MiB in its heap and hand freed memory back at
    the points `give_back` marks (after each layer, block and budget candidate's build). A
    fixed mmap threshold of 1 MiB — this function's first form — returned every freed block
    at once but made each temporary above it a fresh mapping: 150–210 M page faults and a
    fifth of a SmolLM2 budget's CPU time in the kernel (benchmarks/RESULTS.md, "A fifth of the
    CPU time in page faults"; a budget at hidden 2048 peaks 4% higher now); glibc's sliding
    threshold alone keeps hundreds of MB of freed blocks resident at hidden 2048 (an RSS probe
    on benchmarks/scale.py's checkpoint). Two arenas. No-op off glibc."""
    global _LIBC
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
            libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixed: no sliding)
            libc.mallopt(-8, 2)  # M_ARENA_MAX
            _LIBC = libc
    except OSError:
        pass


GIVE_EVERY = 0.5  # seconds: at most one trim in this long unless forced
_last_given = -math.inf


def give_back(force: bool = False) -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim), after `tame_malloc`;
    a no-op otherwise. A trim walks the whole heap (~6 ms at SmolLM2's sizes, 1,170 of them
    7 s of a --fast budget), so unless `force` it runs only if GIVE_EVERY seconds have passed
    since the last: at most ~1% of the time, and where a layer's work takes longer than that
    (the large models the trims are for) after every layer as before."""
    global _last_given
    if _LIBC is not None and (force or time.monotonic() - _last_given >= GIVE_EVERY):
        _LIBC.malloc_trim(0)
        _last_given = time.monotonic()


def park(model: nn.Module, prefix: str, weights: Weights) -> set[str]:
    """Every tensor outside the blocks (`prefix`…) that the checkpoint holds, and whatever
    shares its storage (a tied head), to `meta`; returns the names to read back (`unpark`)."""
    outside = {n: e for n, e in _tensors(model).items()
               if not n.startswith(prefix + ".") and e[2].device.type != "meta"}
    stored = {n for n in outside if n in weights}
    storages = {outside[n][2].untyped_storage().data_ptr() for n in stored}
    for name, (mod, local, t) in outside.items():
        if name in stored or t.untyped_storage().data_ptr() in storages:
            if local in mod._parameters:
                mod._parameters[local] = nn.Parameter(t.to("meta"), requires_grad=False)
            else:
                mod._buffers[local] = t.to("meta")
    return stored


def unpark(model: nn.Module, names: set[str], weights: Weights, dtype: torch.dtype,
           device: torch.device) -> None:
    """Read back what `park` sent to `meta`, as `open_source` first read it, ties included."""
    materialize(model, "", weights, dtype, device, only=names)
    model.tie_weights()


def streamable(folder: Path) -> bool:
    """A local folder whose weights are safetensors files (GGUF and .bin sources load whole)."""
    return folder.is_dir() and ((folder / INDEX).is_file() or (folder / "model.safetensors").is_file())


def _tensors(module: nn.Module, prefix: str = "") -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """Every parameter and persistent buffer: {full name: (owning module, local name, tensor)}."""
    out = {}
    for mod_name, mod in module.named_modules(prefix=prefix.rstrip(".")):
        skip = getattr(mod, "_non_persistent_buffers_set", set())
        for local, t in list(mod._parameters.items()) + [
                (k, b) for k, b in mod._buffers.items() if k not in skip]:
            if t is not None:
                out[f"{mod_name}.{local}" if mod_name else local] = (mod, local, t)
    return out


def materialize(module: nn.Module, prefix: str, weights: Weights, dtype: torch.dtype,
                device: torch.device, only: set[str] | None = None) -> None:
    """Read every `meta` tensor of `module` (named `prefix`…; with `only`, those names alone)
    from the checkpoint."""
    todo = {name: entry for name, entry in _tensors(module, prefix).items()
            if entry[2].device.type == "meta" and (only is None or name in only)}
    missing = [name for name in todo if name not in weights]
    if missing:
        raise SvdqError(f"the checkpoint has no tensor {missing[0]!r}; it does not match its "
                        "config (re-save it with transformers, or pass --no-stream)")
    values = weights.read(list(todo), dtype, device)
    for name, (mod, local, t) in todo.items():
        value = values[name]
        if tuple(value.shape) != tuple(t.shape):
            raise SvdqError(f"tensor {name!r} of the checkpoint is {tuple(value.shape)}, the "
                            f"config implies {tuple(t.shape)}; the checkpoint is inconsistent")
        if local in mod._parameters:
            mod._parameters[local] = nn.Parameter(value, requires_grad=False)
        else:
            mod._buffers[local] = value


def release(module: nn.Module, prefix: str, stored: set[str], keep: dict[str, torch.Tensor]) -> None:
    """Put `module`'s tensors back on `meta`; `keep` first gets a CPU copy of each tensor that
    does not belong to a module in `stored` (compressed layers, whose tensors are kept already)."""
    for name, (_, local, t) in _tensors(module, prefix).items():
        if t.device.type != "meta" and name[: -len(local) - 1] not in stored:
            keep[name] = t.detach().cpu().clone()
    module.to("meta")


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model.to(device)` for what is loaded; `meta` tensors stay where they are."""
    for _, (mod, local, t) in _tensors(model).items():
        if t.device.type != "meta" and t.device != device:
            if local in mod._parameters:
                mod._parameters[local] = nn.Parameter(t.detach().to(device), requires_grad=False)
            else:
                mod._buffers[local] = t.to(device)
    for mod in model.modules():  # non-persistent buffers (rotary frequencies) too
        for k in getattr(mod, "_non_persistent_buffers_set", set()):
            if mod._buffers.get(k) is not None and mod._buffers[k].device.type != "meta":
                mod._buffers[k] = mod._buffers[k].to(device)
    model.tie_weights()
    return model


def open_source(folder: Path, dtype: str, model_class: type, config, tokenizer):
    """A Source whose blocks stay on `meta` until the walk reads them; what lies outside the
    blocks (embeddings, final norm, head) is read now. None where the checkpoint names the
    blocks' tensors otherwise than the model does: it loads whole."""
    from accelerate import init_empty_weights

    from svdq.models.layers import blocks_of
    from svdq.models.load import DTYPES, Source

    weights = Weights(folder)
    torch_dtype = DTYPES.get(dtype) or _checkpoint_dtype(config, weights)
    with warnings.catch_warnings(), init_empty_weights(include_buffers=False):
        warnings.simplefilter("ignore")
        model = model_class._from_config(config, dtype=torch_dtype)
    prefix, _ = blocks_of(model)
    if any(n not in weights for n in _tensors(model) if n.startswith(prefix + ".")):
        return None  # stored under other names (transformers renames them as it loads: ViT)
    outside = {n for n in _tensors(model) if not n.startswith(prefix + ".")}
    materialize(model, "", weights, torch_dtype, torch.device("cpu"), only=outside & set(weights.files))
    model.tie_weights()  # a tied head is not in the checkpoint: it shares the embedding
    missing = [n for n, (_, _, t) in _tensors(model).items() if n in outside and t.device.type == "meta"]
    if missing:
        raise SvdqError(f"the checkpoint in {folder} has no tensor {missing[0]!r}; re-save it "
                        "with transformers, or pass --no-stream")
    model.eval()
    source = Source(model, tokenizer, "folder", str(folder.resolve()))
    source.weights, source.stream_dtype = weights, torch_dtype
    return source


def _checkpoint_dtype(config, weights: Weights) -> torch.dtype:
    """`--dtype auto`: the config's dtype, else that of the checkpoint's first float tensor."""
    named = getattr(config, "dtype", None)  # (transformers 5 reads a config's torch_dtype into it)
    if isinstance(named, torch.dtype):
        return named
    if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
        return getattr(torch, named)
    stored = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    for kind in weights.kinds.values():
        if kind in stored:
            return stored[kind]
    return torch.float32
