"""User-facing configuration of one quantization run."""
from __future__ import annotations

from dataclasses import asdict, dataclass

RECIPES = ("fptq", "naive-w4a8", "dynamic-w4a8", "smoothquant-w4a8", "rtn-w4a16")
FORMATS = ("qdq", "w4a8")


@dataclass
class Config:
    """What `quantize` does. Defaults follow FPTQ (arXiv 2308.15987) as described in docs/FPTQ.md.

    recipe:          "fptq" classifies each linear by its activation max; "naive-w4a8" makes every
                     linear per-tensor static with no equalization (the baseline FPTQ improves on);
                     "dynamic-w4a8" makes every linear per-token dynamic; "smoothquant-w4a8" folds
                     SmoothQuant scales (smooth_alpha) wherever a producer can take them, then static;
                     "rtn-w4a16" quantizes weights only (activations stay float): the bound W4A8 aims at.
    static_bound:    v <= static_bound          -> int8 per-tensor static (paper's v0 = 15).
    dynamic_bound:   v >  dynamic_bound         -> int8 per-token dynamic (paper's v1 = 150);
                     in between                  -> LAE, then per-tensor static.
    group_size:      INT4 weight group along K (the reduction axis).
    symmetric:       int4 [-8, 7] with scale max|w|/7; False gives uint4 with a zero point.
    format:          "qdq" writes standard QuantizeLinear/DequantizeLinear (runs on any ONNX Runtime, the
                     reference numerics); "w4a8" writes the bundled fptq::W4A8MatMul op (same numerics,
                     integer kernels on CPU and CUDA; load it with fptq_graph.runtime.session).
    compensate_residual: a LayerNorm that feeds linears AND something else (a post-LN residual add)
                     can still take the LAE scale if the other consumers get a Mul by s that undoes
                     it; False makes such linears fall back to dynamic instead.
    """

    recipe: str = "fptq"
    static_bound: float = 15.0
    dynamic_bound: float = 150.0
    group_size: int = 128
    symmetric: bool = True
    format: str = "qdq"
    compensate_residual: bool = True
    smooth_alpha: float = 0.5
    # Calibration
    calib_batch_size: int = 8
    calib_seq_len: int = 512
    calib_samples: int = 128
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        from .errors import FptqError

        if self.recipe not in RECIPES:
            raise FptqError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        if self.format not in FORMATS:
            raise FptqError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.format == "w4a8" and not self.symmetric:
            raise FptqError("format 'w4a8' needs symmetric int4 weights (its kernels take no zero points)")
        if not 0 <= self.static_bound < self.dynamic_bound:
            raise FptqError(
                f"bounds must satisfy 0 <= static_bound < dynamic_bound, got {self.static_bound} and {self.dynamic_bound}"
            )
        if not 0.0 < self.smooth_alpha < 1.0:
            raise FptqError(f"smooth_alpha must be in (0, 1), got {self.smooth_alpha}")
        if self.group_size < 2 or self.group_size % 2:
            raise FptqError(f"group_size must be an even number >= 2, got {self.group_size}")
        for name in ("calib_batch_size", "calib_seq_len", "calib_samples"):
            if getattr(self, name) < 1:
                raise FptqError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)
