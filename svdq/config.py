"""Settings of a compression run: frozen, validated, versioned, written into the manifest."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from decimal import Decimal

from svdq.algo.factorize import METHODS
from svdq.algo.quant import BITS
from svdq.runtime import INT_BITS
from svdq.errors import SvdqError

SETTINGS_VERSION = 1


@dataclass(frozen=True)
class Settings:
    eps: float = 0.05
    bits: int = 8
    block_size: int = 64
    grid: str = "auto"  # the weights' grid: bnb (NF4, 8-bit blocks) or int; auto: int below 4 bits
    gptq: bool = True  # quantize weights (dense, residual bases) by GPTQ instead of rounding
    method: str = "auto"  # resolved when constructed: see `resolve_method`
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
    refit: bool = False  # refit each low-rank U by least squares against the source layer's outputs
    residual: bool = False  # eps mode: quantize every weight at `bits`, low rank corrects the error
    budget_bytes: int | None = None  # --size: total stored bytes of the target layers (eps unused)
    budget_ratio: float | None = None  # --ratio: that total as a fraction of their fp16 bytes
    offload_activations: bool = False  # calibration streams in files, not memory
    sparse: float = 0.0  # share of each linear layer's entries kept exactly (float16): eps mode
    # adds the term where it saves bytes at eps, a budget offers it among the options
    attention_product: bool = False  # queries and keys stored as their product per head (eps
    # mode: where it saves bytes; a budget: one more candidate plan, judged)
    embed_bits: int = 0  # the input embedding (and heads tied to it) stored at 4 or 8 bits on
    # the integer grid, groups of block_size along each row; 0: left as it is
    budget_scope: str = "targets"  # what --ratio/--size count: the target layers, or "all":
    # every tensor of the checkpoint as the artifact stores it
    fast: bool = False  # budgets: the quicker plan search of `pipeline.fast`
    _version: int = field(default=SETTINGS_VERSION, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.eps < 1:
            raise SvdqError(f"--eps must lie in (0, 1), got {self.eps}; e.g. --eps 0.05 allows a "
                            "5% relative output error per layer")
        if self.grid == "auto":
            object.__setattr__(self, "grid", "int" if self.bits in (2, 3) else "bnb")
        if self.grid not in ("bnb", "int"):
            raise SvdqError(f"--grid must be auto, bnb or int, got {self.grid!r}")
        widths = INT_BITS if self.grid == "int" else BITS
        if self.bits not in widths:
            raise SvdqError(f"--bits {self.bits} is not supported on the {self.grid} grid; use "
                            + ("2, 3, 4 or 8 (uniform integer codes)" if self.grid == "int" else
                               "4 (NF4), 8 (blockwise 8-bit) or 16 (float16 factors), or 2 or 3 "
                               "with --grid int"))
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise SvdqError(f"--block-size must be a power of two ≥ 16, got {self.block_size}")
        if self.method == "auto":
            object.__setattr__(self, "method", resolve_method(self))
        if self.method not in METHODS:
            raise SvdqError(f"--method {self.method!r} is unknown; choose auto or one of "
                            f"{', '.join(sorted(METHODS))}")
        for name in ("calib_samples", "calib_len", "batch_size"):
            if getattr(self, name) < 1:
                raise SvdqError(f"--{name.replace('_', '-')} must be at least 1")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise SvdqError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise SvdqError(f"--dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.budget_ratio is not None and not (0 < self.budget_ratio < math.inf):
            raise SvdqError(f"--ratio must be a positive number (stored bytes of the target layers "
                            f"over their fp16 bytes), e.g. --ratio 0.3; got {self.budget_ratio}")
        if self.budget_ratio is not None and self.budget_ratio >= 1:
            raise SvdqError(f"--ratio {self.budget_ratio:g} compresses nothing: at 1 every target "
                            "layer already fits in float16; give a ratio below 1, e.g. --ratio 0.3")
        if self.budget_bytes is not None and self.budget_bytes < 1:
            raise SvdqError(f"--size must be positive, e.g. --size 60MB; got {self.budget_bytes} bytes")
        if self.budget_ratio is not None and self.budget_bytes is not None:
            raise SvdqError("give one budget: --ratio or --size, not both")
        if not 0 <= self.sparse < 0.25:
            raise SvdqError(f"--sparse is the share of a layer's entries kept exactly, in "
                            f"[0, 0.25), e.g. --sparse 0.005; got {self.sparse}")
        if self.sparse and self.refit:
            raise SvdqError("--refit does not take a sparse term yet; drop --refit or --sparse")
        if self.attention_product and self.bits == 16:
            raise SvdqError("--attention-product takes quantized weights (--bits 2–8): drop "
                            "--bits 16 or --attention-product")
        if self.embed_bits not in (0, 4, 8):
            raise SvdqError(f"--embed-bits must be 4 or 8 (0: leave the embedding as it is), got "
                            f"{self.embed_bits}")
        if self.budget_scope not in ("targets", "all"):
            raise SvdqError(f"--budget-scope must be targets or all, got {self.budget_scope!r}")
        if self.budget_scope == "all" and not self.budgeted:
            raise SvdqError("--budget-scope all says what --ratio/--size count: give one of them")
        if self.fast and not self.budgeted:
            raise SvdqError("--fast speeds up a budget's plan search: give --ratio or --size "
                            "(an --eps run has no plans to search), or drop --fast")

    @property
    def budgeted(self) -> bool:
        """A total byte budget (--ratio/--size) decides instead of eps."""
        return self.budget_bytes is not None or self.budget_ratio is not None

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


def resolve_method(settings: Settings) -> str:
    """`--method auto`: `whiten` where low rank corrects quantization error (--residual, budgets),
    `svd` where it replaces a layer under a per-layer eps. Measured (benchmarks/RESULTS.md):
    whitened corrections beat plain and Fisher-weighted ones by a wide margin (MiniLM at 0.4 ×
    fp16: similarity 0.9936 against 0.9895 and 0.9899), while at the same eps whitening
    leaves more layers low-rank and the model worse (SmolLM2, 8 bits, eps 0.05: perplexity 28.1
    against 24.1)."""
    budgeted = settings.budget_bytes is not None or settings.budget_ratio is not None
    return "whiten" if settings.residual or budgeted else "svd"


SIZE_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9,
              "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


def parse_size(text: str, option: str = "--size") -> int:
    """'60MB', '1.5GiB', '200000' (bytes) -> bytes, rounded down; units ignore case."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].lower() not in SIZE_UNITS:
        raise SvdqError(f"{option} takes a number and a unit (B, KB, MB, GB, KiB, MiB, GiB), e.g. "
                        f"{option} 60MB; got {text!r}")
    n = int(Decimal(m[1]) * SIZE_UNITS[m[2].lower()])
    if n < 1:
        raise SvdqError(f"{option} must be at least 1 byte, got {text!r}")
    return n
