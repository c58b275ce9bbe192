"""User-facing configuration of one quantization run."""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields, replace

from fptq_graph.recipes import RECIPES, ROTATIONS, WEIGHT_QUANTIZERS, RecipeError, recipe_row  # noqa: F401  (RECIPES: the built-in names)

FORMATS = ("qdq", "w4a8", "ort")
# The block sizes ONNX Runtime's MatMulNBits kernels accept (onnxruntime 1.31, CPU and CUDA).
ORT_BLOCK_SIZES = (16, 32, 64, 128, 256)
# How the LM head (the linear producing `logits`) is stored: float, int8 per output channel, or INT4 group-wise.
LM_HEAD_MODES = ("float", "int8", "int4")


@dataclass(frozen=True)
class Config:
    """What `quantize` does. Defaults follow FPTQ (arXiv 2308.15987) as described in docs/FPTQ.md.

    Validated, frozen data: an invalid combination is refused when the Config is made (one FptqError
    line, the same from the API and the CLI), and nothing changes it after. It remembers which fields the
    caller gave (`given`): a TOML recipe's [options] fill in only the others, so a value the caller set
    wins even where it equals the default. `config.evolve(field=value)` is a changed copy with those
    fields given too (dataclasses.replace would count every field as given).

    recipe:          a built-in recipe's name (recipes.RECIPES), the path of a TOML recipe, or a recipes.Recipe;
                     "fptq" classifies each linear by its activation max; "naive-w4a8" makes every
                     linear per-tensor static with no equalization (the baseline FPTQ improves on);
                     "dynamic-w4a8" makes every linear per-token dynamic; "smoothquant-w4a8" folds
                     SmoothQuant scales (smooth_alpha) wherever a producer can take them, then static;
                     "w8a8-smoothquant" is SmoothQuant with int8 per-output-channel weights (the W8A8
                     reference point); "rtn-w4a16" quantizes weights only (activations stay float): the
                     bound W4A8 aims at.
    static_bound:    v <= static_bound          -> int8 per-tensor static (paper's v0 = 15).
    dynamic_bound:   v >  dynamic_bound         -> int8 per-token dynamic (paper's v1 = 150);
                     in between                  -> LAE, then per-tensor static.
    group_size:      INT4 weight group along K (the reduction axis).
    symmetric:       int4 [-8, 7], the group's largest-magnitude weight m on -8 (scale m / -8); False gives
                     uint4 with a zero point.
    lm_head:         the LM head (the linear producing the model output `logits`): "int8" (the default) stores
                     int8 per-output-channel symmetric weights, activations by its classified scheme (SmolLM2:
                     perplexity +0.7% against a float head, file 167 -> 88 MiB); "float" keeps it float (as
                     GPTQ, AWQ and SmoothQuant do); "int4" quantizes it like every other linear (INT4, group
                     lm_head_group_size or group_size; SmolLM2: +93% at group 128, +20% at 32). When its
                     weight is also an embedding Gather's table (tied embeddings), the int8 head and the
                     lookup read one quantized table (passes/analysis/plan_lm_head.py; each emitter in passes/lower/ writes it).
    lm_head_group_size: the INT4 group of an int4 head (None: group_size).
    quantize_lm_head: the older switch, an alias of lm_head="int4" (it wins over lm_head).
    embedding:       untied embedding tables (a Gather's own constant table: BERT's word/position/type
                     tables, a decoder's untied embed_tokens): "int8" stores int8 codes with one scale per
                     row, "int4" INT4 groups (of lm_head_group_size or group_size) along the row, "float"
                     keeps them; None (the default) follows the head (lm_head), so int8. Lookups dequantize
                     only the rows they read (passes/lower/emit_embeddings.py).
    gptq:            quantize weights with GPTQ (error feedback through the calibration Hessian X^T X,
                     which calibration then also records) instead of round-to-nearest.
    weight_quantizer: "rtn", "clip" (each group's clipping ratio searched on diag(X^T X)-weighted error,
                     weight_clipping.py), "gptq" or "gptq-clip" (GPTQ on clipped scales); None takes the
                     recipe's own (recipes.py; `fptq-graph quantize --recipe list`).
    act_order:       GPTQ: rows in order of decreasing diag(X^T X), group scales fixed up front.
    measured_tolerance_db: the measured classifier (recipe fptq-measured) keeps a layer per-tensor static
                     when its estimated output SQNR is within this of the best scheme's.
    format:          "qdq" writes standard QuantizeLinear/DequantizeLinear (runs on any ONNX Runtime, the
                     reference numerics); "w4a8" writes the bundled fptq::W4A8MatMul op (same numerics,
                     integer kernels on CPU and CUDA; load it with fptq_graph.runtime.sessions); "ort" writes
                     ONNX Runtime's com.microsoft.MatMulNBits weights (stock ORT, CPU and CUDA), activations
                     as in qdq.
    ort_accuracy_level: the ort form's MatMulNBits accuracy_level. 0 (default): ORT computes in float
                     what the graph says, equal to the qdq form. 4: ORT's CPU kernel quantizes each
                     linear's input to int8 per block of K and multiplies in int8, the incumbent's fast
                     path (the GenAI builder's int4 default); the graph then writes no activation QDQ
                     (the schemes still decide the LAE folds; weights-only layers get int8 activations
                     too). About 1.5x the decode speed of 0 (docs/benchmarks.md).
    rotate:          "hadamard" rotates the residual stream of a pre-norm decoder before anything is observed
                     (passes/rewrite/rotate_residual.py: a randomized Hadamard matrix of the hidden size, seeded
                     by `rotate_seed`, folded into the embedding and every linear reading or writing the stream; the
                     float model computes the same, checked on one calibration sample); "none" does not; None
                     (the default) takes the recipe's (recipe fptq-rot rotates). A model whose stream cannot be
                     rotated exactly (post-LN encoders, LayerNorm) is left unrotated, the reason in the report.
    rotate_ffn:      with a rotation, also rotate each FFN down projection's input (the gated product) by a
                     Hadamard matrix at run time: explicit Reshape and MatMul ops before it (about
                     inner + outer multiply-adds per channel, 140 for 1536 = 12 x 128), its inverse folded into
                     the down projection's weight; spreads the outliers of what is the per-token band's usual
                     linear, and makes its INT4 groups incoherent. Off by default (it costs run time).
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
    ort_accuracy_level: int = 0      # the ort form's MatMulNBits accuracy_level: 0 (the graph's numerics) or 4 (ORT's int8 kernels)
    compensate_residual: bool = True
    smooth_alpha: float = 0.5
    gptq: bool = False
    weight_quantizer: str | None = None   # "rtn", "clip", "gptq", "gptq-clip"; None: the recipe's (recipes.py), gptq with gptq=True
    rotate: str | None = None        # "hadamard" or "none"; None: the recipe's (recipes.py)
    rotate_seed: int = 0             # the rotation's random signs (quant/rotation.py); recorded in the report
    rotate_ffn: bool = False         # also rotate each down projection's input at run time (an explicit op; rotate_residual)
    act_order: bool = False          # GPTQ: rows by decreasing diag(X^T X), group scales fixed up front (gptq.py)
    measured_tolerance_db: float = 0.5   # measured classifier: static when within this of per-token's output SQNR
    statistics_budget_mib: int | None = None   # X^T X memory allowed before AWQ/GPTQ give way to clipping (None: the float weights' size, >= 1 GiB)
    lm_head: str = "int8"            # "float", "int8" or "int4": how the LM head (the linear producing `logits`) is stored
    lm_head_group_size: int | None = None   # INT4 group of an int4 LM head (None: group_size)
    quantize_lm_head: bool = False   # alias of lm_head="int4"
    embedding: str | None = None     # untied embedding tables: "float", "int8" (per row) or "int4" (groups of lm_head_group); None: as the head
    gptq_damp: float = 0.01          # GPTQ: dampening added to diag(H), as a fraction of its mean
    sqnr_samples: int = 2            # calibration sequences the report's per-layer output SQNR is measured on
    # Block by block (sequential/): None decides (block by block when the whole-graph run would not fit
    # memory_budget_mib, or would have to trade AWQ/GPTQ for memory); True forces it, False refuses it.
    sequential: bool | None = None
    memory_budget_mib: int | None = None   # what the whole-graph run may take (None: 60% of the available memory)
    block_inputs: str = "float"      # block by block: each block calibrated on the float model's activations
                                     # ("float") or on what the already quantized blocks before it give ("quantized")
    # Calibration
    calib_batch_size: int = 8
    calib_seq_len: int = 512
    calib_samples: int = 128
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @property
    def given(self) -> frozenset[str]:
        """The fields the caller set (by name or position), whatever their values."""
        return self.__dict__.get("_given", frozenset(f.name for f in fields(self)))

    def evolve(self, **changes) -> "Config":
        """A copy with `changes`, which count as given."""
        return _made(self, changes, self.given | set(changes))

    def validate(self) -> None:
        from fptq_graph.errors import FptqError

        try:
            row = recipe_row(self.recipe)
        except RecipeError as exc:
            raise FptqError(str(exc)) from None
        if self.format not in FORMATS:
            raise FptqError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.format in ("w4a8", "ort") and row.weight_bits == 8:
            raise FptqError(f"format {self.format!r} takes INT4 weights; recipe {row.name!r} has int8 weights: use --format qdq")
        self._check_int4_group(self.group_size, "group_size", "", "MatMulNBits")
        if self.lm_head not in LM_HEAD_MODES:
            raise FptqError(f"unknown lm_head {self.lm_head!r}; choose one of {', '.join(LM_HEAD_MODES)}")
        if self.embedding is not None and self.embedding not in LM_HEAD_MODES:
            raise FptqError(f"unknown embedding {self.embedding!r}; choose one of {', '.join(LM_HEAD_MODES)}")
        # The head and the untied tables share one group (lm_head_group); each is checked only when it
        # is INT4, against the ONNX Runtime op that would carry it in the 'ort' form.
        if self.lm_head_mode == "int4":
            self._check_int4_group(self.lm_head_group, "lm_head_group_size", " for the LM head", "MatMulNBits")
        if self.embedding_mode == "int4":
            self._check_int4_group(self.lm_head_group, "the embedding's INT4 group (lm_head_group_size or group_size)",
                                   " for the embedding tables", "GatherBlockQuantized")
        if self.ort_accuracy_level not in (0, 4):
            raise FptqError(f"ort_accuracy_level must be 0 or 4, got {self.ort_accuracy_level}")
        if self.ort_accuracy_level and self.format != "ort":
            raise FptqError(f"ort_accuracy_level applies to format 'ort' (MatMulNBits), not {self.format!r}")
        if self.format == "w4a8" and not self.symmetric:
            raise FptqError("format 'w4a8' needs symmetric int4 weights (its kernels take no zero points)")
        if not 0 <= self.static_bound < self.dynamic_bound:
            raise FptqError(
                f"bounds must satisfy 0 <= static_bound < dynamic_bound, got {self.static_bound} and {self.dynamic_bound}"
            )
        if not 0.0 < self.smooth_alpha < 1.0:
            raise FptqError(f"smooth_alpha must be in (0, 1), got {self.smooth_alpha}")
        if self.weight_quantizer is not None and self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise FptqError(f"unknown weight quantizer {self.weight_quantizer!r}; choose one of {', '.join(WEIGHT_QUANTIZERS)}")
        if self.rotate is not None and self.rotate not in ROTATIONS:
            raise FptqError(f"unknown rotation {self.rotate!r}; choose one of {', '.join(ROTATIONS)}")
        if self.rotate_ffn and (self.rotate or recipe_row(self.recipe).rotate) == "none":
            raise FptqError("rotate_ffn (--rotate-ffn) rotates inside the rotated model: it needs --rotate hadamard "
                            "or a recipe that rotates (fptq-rot)")
        if self.gptq and self.weight_quantizer not in (None, "gptq", "gptq-clip"):
            raise FptqError(f"gptq=True (--gptq) contradicts weight_quantizer={self.weight_quantizer!r}")
        if self.measured_tolerance_db < 0:
            raise FptqError(f"measured_tolerance_db must be >= 0, got {self.measured_tolerance_db}")
        if not 0.0 < self.gptq_damp < 1.0:
            raise FptqError(f"gptq_damp must be in (0, 1), got {self.gptq_damp}")
        if self.block_inputs not in ("float", "quantized"):
            raise FptqError(f"block_inputs must be 'float' or 'quantized', got {self.block_inputs!r}")
        if self.block_inputs == "quantized" and self.sequential is False:
            raise FptqError("block_inputs='quantized' (--block-inputs quantized) needs the block-by-block run, which "
                            "sequential=False (--no-sequential) refuses")
        if self.memory_budget_mib is not None and self.memory_budget_mib < 1:
            raise FptqError(f"memory_budget_mib must be >= 1, got {self.memory_budget_mib}")
        if self.sqnr_samples < 0:
            raise FptqError(f"sqnr_samples must be >= 0, got {self.sqnr_samples}")
        for name in ("calib_batch_size", "calib_seq_len", "calib_samples"):
            if getattr(self, name) < 1:
                raise FptqError(f"{name} must be >= 1, got {getattr(self, name)}")

    def _check_int4_group(self, group: int, name: str, where: str, ort_op: str) -> None:
        """One INT4 group: even (two codes a byte) and >= 2, and in the 'ort' form one ORT_BLOCK_SIZES
        value, since ONNX Runtime's op (ort_op) takes no other block size."""
        from fptq_graph.errors import FptqError

        if group < 2 or group % 2:
            raise FptqError(f"{name} must be an even number >= 2, got {group}")
        if self.format == "ort" and group not in ORT_BLOCK_SIZES:
            raise FptqError(f"format 'ort' (ONNX Runtime's {ort_op}) takes group sizes "
                            f"{', '.join(map(str, ORT_BLOCK_SIZES))}, got {group}{where}")

    @property
    def lm_head_mode(self) -> str:
        """How the LM head is stored: quantize_lm_head (the older switch) means "int4"."""
        return "int4" if self.quantize_lm_head else self.lm_head

    @property
    def embedding_mode(self) -> str:
        """How untied embedding tables are stored: Config.embedding, else as the head."""
        return self.embedding if self.embedding is not None else self.lm_head_mode

    @property
    def embedding_group(self) -> int:
        """The INT4 group of an int4 table: the head's."""
        return self.lm_head_group

    @property
    def lm_head_group(self) -> int:
        return self.lm_head_group_size if self.lm_head_group_size is not None else self.group_size

    @property
    def weight_bits(self) -> int:
        return recipe_row(self.recipe).weight_bits

    def with_recipe_options(self) -> "Config":
        """This config with the recipe's [options] put in where the caller gave no value (a value the
        caller set wins over the recipe's, even the default's own); built-in recipes have none."""
        row = recipe_row(self.recipe)
        changes = {k: v for k, v in row.options if k not in self.given}
        return _made(self, changes, self.given) if changes else self

    def to_dict(self) -> dict:
        return asdict(self)


def _made(config: Config, changes: dict, given) -> Config:
    made = replace(config, **changes)
    object.__setattr__(made, "_given", frozenset(given))
    return made


def _recording_given(init):
    """Config's generated __init__, recording which fields the call named (the recipe's options fill in
    the rest: with_recipe_options)."""
    names = [f.name for f in fields(Config)]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        object.__setattr__(self, "_given", frozenset(names[:len(args)]) | frozenset(kwargs))
    return __init__


Config.__init__ = _recording_given(Config.__init__)
