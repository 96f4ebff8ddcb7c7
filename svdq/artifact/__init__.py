"""Write an artifact folder atomically, and read it back (through `svdq.runtime`).

Layout: model.safetensors (or shards and their index), svdq.json (manifest), config.json,
tokenizer and generation config files, svdq_loader.py (a verbatim copy of svdq/runtime.py),
README.md (the model card, `card`). The folder is written under a
temporary name beside the target and renamed at the end, so an interrupted run leaves nothing
half-written behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from svdq import __version__, runtime
from svdq.artifact import card, hf_quantizer, outdir
from svdq.artifact.writer import TensorWriter
from svdq.config import Settings
from svdq.errors import SvdqError
from svdq.models.load import Source
from svdq.plan import Result


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse, before any work is done, an output folder that would be clobbered."""
    outdir.check(out, overwrite)


def untouched_tensors(result: Result, written: set[str] = frozenset()
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the model outside the target layers (the pipeline stores theirs, kept
    ones included), each storage once, less those already `written` (a streamed block's, sent
    to the writer as the block was released).

    Returns the tensors and the aliases: {tied name: stored name} (e.g. lm_head -> embeddings).
    """
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for key, t in result.model.state_dict(keep_vars=False).items():
        if key.rpartition(".")[0] in result.planned:
            continue
        if t.device.type == "meta":  # a streamed block's, kept when it was released
            if key not in written:
                tensors[key] = result.released[key]
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach()  # the writer copies only views of a larger storage
    return tensors, aliases


def totals(layers: list[dict], tensor_bytes: int, params: int, source_elsize: int) -> dict:
    lowrank = [p for p in layers if p["kind"] == "lowrank"]
    residual = [p for p in layers if p["kind"] == "residual"]
    layer_bytes = sum(p["bytes"] for p in layers)
    layer_fp16 = sum(p["fp16_bytes"] for p in layers)
    return {
        "layers": len(layers), "lowrank_layers": len(lowrank),
        "residual_layers": len(residual),
        "target_bytes": layer_bytes, "target_fp16_bytes": layer_fp16,
        "target_ratio_fp16": layer_bytes / layer_fp16,
        "artifact_tensor_bytes": tensor_bytes, "source_params": params,
        "checkpoint_fp16_bytes": 2 * params, "checkpoint_source_bytes": source_elsize * params,
        "checkpoint_ratio_fp16": tensor_bytes / (2 * params),
        "checkpoint_ratio_source": tensor_bytes / (source_elsize * params),
    }


def _config_dict(model) -> dict:
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF source's; the artifact is plain weights
    config.pop("_commit_hash", None)
    config["architectures"] = [type(model).__name__]  # GGUF sources record none
    return config


SHARD_BYTES = 2 * 10 ** 9  # tensor bytes per file at most, as `--shard-size` defaults to


def float_storage(source: Source) -> tuple[torch.dtype, torch.dtype] | None:
    """The writer's cast: (float32, `source.stored_dtype`) where the source's float32 is only
    transformers' de-quantization of a GGUF file (`models.load.load_source`), else None
    (tensors stored as the model holds them)."""
    if source.stored_dtype is None:
        return None
    return next(source.model.parameters()).dtype, source.stored_dtype


def save(out: Path, source: Source, result: Result, settings: Settings,
         overwrite: bool = False, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the artifact to `out`; returns the manifest."""
    with writing(out, overwrite, shard_bytes, float_storage(source)) as pending:
        return pending.finish(source, result, settings)


@contextlib.contextmanager
def writing(out: Path, overwrite: bool = False, shard_bytes: int = SHARD_BYTES,
            cast: tuple[torch.dtype, torch.dtype] | None = None) -> Iterator["Pending"]:
    """An artifact being written into a temporary folder beside `out`, holding the output
    lock: tensors may go to `pending.tensors` while the model is compressed, and
    `pending.finish` completes it and swaps it in. Anything raised leaves nothing behind.
    `cast`: the writer's (`float_storage`)."""
    with outdir.locked(out):
        check_output(out, overwrite)  # again: the folder may have changed since the first check
        out = out.resolve()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        pending = Pending(out, tmp, TensorWriter(tmp, shard_bytes, cast=cast))
        try:
            yield pending
        except BaseException as e:
            held = outdir.folder_bytes(tmp)  # with the scratch: kept statistics, streams
            shutil.rmtree(tmp, ignore_errors=True)
            full = outdir.no_space(e, out.parent, max(held, pending.tensors.total_bytes)
                                   + (4 << 20))
            if full is not None:
                raise full from None
            raise


@dataclass
class Pending:
    out: Path
    tmp: Path
    tensors: TensorWriter

    def finish(self, source: Source, result: Result, settings: Settings) -> dict:
        """Write what is left (untouched tensors, manifest, config, tokenizer, loader) and
        rename the folder into place; returns the manifest."""
        untouched, aliases = untouched_tensors(result, written=self.tensors.keys)
        if not self.tensors.keys:
            outdir.check_space(self.out.parent, sum(t.numel() * t.element_size() for t in
                                                    [*untouched.values(), *result.tensors.values()]))
        self.tensors.add(untouched)
        self.tensors.add(result.tensors)
        files = self.tensors.close()
        tmp, tensor_bytes = self.tmp, self.tensors.total_bytes
        dtype = next(result.model.parameters()).dtype
        # format 6 only where it says something 5 cannot (`stored_dtype`)
        version = (runtime.FORMAT_VERSION if any(p.get("lookup") is not None for p in result.layers)
                   else runtime.ROWS_FORMAT if any(p.get("rows") for p in result.layers)
                   else runtime.SPARSE_FORMAT if any(p.get("sparse_nnz") for p in result.layers)
                   else runtime.PLAIN_FORMAT if self.tensors.cast is None
                   else runtime.STORED_DTYPE_FORMAT)
        notes = list(source.notes + result.notes)
        if self.tensors.cast is not None:
            notes.append(f"the tensors svdq does not quantize are stored in "
                         f"{str(self.tensors.cast[1]).removeprefix('torch.')}: the GGUF source "
                         "was float32 only because it was de-quantized (--dtype float32 keeps "
                         "float32)")
        manifest = {
            "format_version": version, "svdq_version": __version__,
            "source": {"kind": source.kind, "id": source.id, "revision": source.revision,
                       "sha256": source.sha256},
            "architecture": type(result.model).__name__, "dtype": str(dtype).removeprefix("torch."),
            "settings": settings.to_dict(), "calibration": result.calibration,
            "timings_s": {k: round(v, 2) for k, v in result.timings.items()},
            **({"device": result.device} if result.device else {}),
            "notes": notes, "aliases": aliases, "layers": result.layers,
            "totals": totals(result.layers, tensor_bytes, result.source_params, dtype.itemsize),
            **({"budget": result.budget} if result.budget is not None else {}),
            **({"stored_dtype": str(self.tensors.cast[1]).removeprefix("torch.")}
               if self.tensors.cast is not None else {}),
            **({"sha256": files[runtime.TENSORS]} if runtime.TENSORS in files else {"shards": files}),
        }
        manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
        (tmp / runtime.MANIFEST).write_text(json.dumps(manifest, indent=1))
        config = {**_config_dict(result.model),
                  "quantization_config": hf_quantizer.quantization_config(result.layers, version)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(str(tmp))
        if getattr(result.model, "generation_config", None) is not None and source.is_causal:
            result.model.generation_config.save_pretrained(str(tmp))
        shutil.copyfile(runtime.__file__, tmp / "svdq_loader.py")
        try:
            card.write(tmp, manifest)
        except (KeyError, TypeError, ValueError, AttributeError, OSError):
            pass  # documentation only: a card that cannot be written never costs the artifact
        outdir.publish_modes(tmp)
        move_into_place(tmp, self.out)
        return manifest


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old `out` is removed only after that."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)  # put the previous artifact back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def locate(spec: str | Path, revision: str | None = None, required: bool = True) -> Path:
    """The local folder of artifact `spec`: a folder as given, or a hub repo id ("user/name")
    holding an artifact, downloaded once into the Hugging Face cache (every file: tensors,
    manifest, card, loader). Anything else — a missing folder, a hub repo without svdq.json —
    comes back as given (`read` refuses it; `svdq eval` loads it as a plain model), and so does
    a hub id not in the local cache while the hub is unreachable unless the artifact is
    `required` (then that is the error)."""
    path = Path(spec).expanduser()
    text = str(spec)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return path
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError,
                                        LocalEntryNotFoundError)

    from svdq.models.load import hub_reachable

    offline = not hub_reachable()
    try:
        hf_hub_download(text, runtime.MANIFEST, revision=revision, local_files_only=offline)
        return Path(snapshot_download(text, revision=revision, local_files_only=offline))
    except LocalEntryNotFoundError:  # (a subclass of the next: first)
        if not required:
            return path
        raise SvdqError(f"{spec} is neither a folder nor in the local Hugging Face cache, and "
                        "the hub is unreachable; give the artifact's folder") from None
    except EntryNotFoundError:
        return path  # a hub model, not an artifact
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise SvdqError(f"cannot download {spec} from the Hugging Face hub "
                        f"({str(e).splitlines()[0]}); check the repo id") from None


def annotate(path: Path, **fields) -> dict:
    """Set top-level `fields` of artifact `path`'s manifest (records of how it was made, never
    anything a loader reads), its own checksum made again; the file is replaced atomically.
    Returns the new manifest."""
    manifest = {k: v for k, v in read(path).items() if k != "manifest_sha256"}
    manifest.update(fields)
    manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    tmp = Path(path) / f".{runtime.MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, Path(path) / runtime.MANIFEST)
    try:
        card.write(Path(path), manifest)
    except (KeyError, TypeError, ValueError, AttributeError, OSError):
        pass  # documentation only
    return manifest


def read(path: str | Path, verify: bool = True) -> dict:
    """The manifest of an artifact, checked; a damaged artifact is an SvdqError."""
    try:
        return runtime.read_manifest(path, verify)
    except runtime.ArtifactError as e:
        raise SvdqError(str(e)) from None


def load(path: str | Path, device: str = "cpu", verify: bool = True, dequantize: bool = False,
         dtype=None):
    """Load an artifact as a ready transformers model, its layers kept as stored
    (`runtime.StoredLinear`) or, with `dequantize`, expanded to float layers (`runtime.load`);
    `dtype` runs it in another float dtype than the manifest's. `path`: a folder or a hub
    repo id (`locate`)."""
    path = locate(path)
    try:
        return runtime.load(path, device=device, verify=verify, dequantize=dequantize, dtype=dtype)
    except runtime.ArtifactError as e:
        raise SvdqError(str(e)) from None
