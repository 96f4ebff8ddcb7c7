"""Settings of a compression run: frozen, validated, versioned, written into the manifest."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from svdq.algo.factorize import METHODS
from svdq.algo.quant import BITS
from svdq.errors import SvdqError

SETTINGS_VERSION = 1


@dataclass(frozen=True)
class Settings:
    eps: float = 0.05
    bits: int = 8
    block_size: int = 64
    method: str = "svd"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    calib: str = "auto"  # "auto" | "wikitext" | "self" | a text file
    calib_samples: int = 32
    calib_len: int = 512
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    sequential: bool = False  # calibrate each block on the outputs of the compressed blocks before it
    _version: int = field(default=SETTINGS_VERSION, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.eps < 1:
            raise SvdqError(f"--eps must lie in (0, 1), got {self.eps}; e.g. --eps 0.05 allows a "
                            "5% relative output error per layer")
        if self.bits not in BITS:
            raise SvdqError(f"--bits {self.bits} is not supported; use 4 (NF4), 8 (blockwise "
                            "8-bit) or 16 (float16 factors)")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise SvdqError(f"--block-size must be a power of two ≥ 16, got {self.block_size}")
        if self.method not in METHODS:
            raise SvdqError(f"--method {self.method!r} is unknown; choose one of "
                            f"{', '.join(sorted(METHODS))}")
        for name in ("calib_samples", "calib_len", "batch_size"):
            if getattr(self, name) < 1:
                raise SvdqError(f"--{name.replace('_', '-')} must be at least 1")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise SvdqError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise SvdqError(f"--dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")

    def to_dict(self) -> dict:
        data = asdict(self)
        version = data.pop("_version")
        data["include"], data["exclude"] = list(self.include), list(self.exclude)
        return {"_type": "svdq.Settings", "_version": version, "_data": data}

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        if d.get("_version") != SETTINGS_VERSION:
            raise SvdqError(f"settings version {d.get('_version')} is not supported")
        data = dict(d["_data"])
        data["include"], data["exclude"] = tuple(data["include"]), tuple(data["exclude"])
        return cls(**data)
