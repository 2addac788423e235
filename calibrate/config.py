"""Typed configuration of calibration: one dataclass for the Python API and the CLI.

``dtq-calibrate`` builds its argparse parser from these fields (``metadata["help"]``), so a
field added here is an option there too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .. import formats
from ..checks import check_finite_fields

MethodName = Literal["minmax", "percentile", "mse", "smoothquant", "ptq4dit", "ditas"]
ScaleSearch = Literal["minmax", "percentile", "mse"]
# the choices are the precision table's (dtq.formats); the tests check the two agree
PrecisionName = Literal["int8", "fp8", "w8a16", "w4a16", "w4a8"]
WeightGranularity = Literal["tensor", "channel", "group32", "group64", "group128"]
ActGranularity = Literal["tensor", "token"]  # dtq.formats.ACT_GRANULARITIES
DEFAULT_LAYERS = list(formats.ALL_ROLES)  # a model quantizes the roles it has (runtime/adapters.py)


def _h(text: str, **kw) -> dict:
    return {"help": text, **kw}


@dataclass
class CalibDataConfig:
    """How the calibration set is collected: the FP sampler from noise with random labels."""

    cali_steps: int = field(default=25, metadata=_h("timesteps recorded, spread uniformly over the trajectory"))
    cali_n: int = field(default=32, metadata=_h("samples per recorded timestep (guidance doubles the rows)"))
    steps: int = field(default=100, metadata=_h("respaced sampler steps of the FP trajectory"))
    sampler: Literal["ddpm", "ddim"] = field(default="ddpm", metadata=_h("sampler of the FP trajectory"))
    cfg_scale: float = field(default=1.5, metadata=_h("classifier-free guidance scale (1 = none)"))
    seed: int = field(default=0, metadata=_h("seed of noise, labels and sampler noise"))
    cali_batch: int = field(default=0, metadata=_h(
        "samples per sampler batch (0: all cali_n in one); under torchrun batch i runs on rank i mod N, "
        "and the set depends on this, not on N"))
    clip_denoised: bool = field(default=True, metadata=_h("clip predicted x0 to [-1, 1] (pixel-space models)"))

    def __post_init__(self) -> None:
        check_finite_fields(self)
        if not 1 <= self.cali_steps <= self.steps:
            raise ValueError(f"cali_steps must be in 1..steps ({self.steps}), got {self.cali_steps}")
        if self.cali_n < 1:
            raise ValueError("cali_n must be >= 1")
        if self.cali_batch < 0:
            raise ValueError("cali_batch must be >= 0 (0: one batch)")


@dataclass
class CalibConfig:
    """What to quantize and how. ``calibrate(model, data, CalibConfig(...)) -> Recipe``."""

    method: MethodName = field(default="minmax", metadata=_h("PTQ method"))
    precision: PrecisionName = field(default="int8", metadata=_h(
        "weights x activations: int8 (W8A8), fp8 (W8A8 E4M3), w8a16 / w4a16 (weight-only), w4a8"))
    weight_granularity: WeightGranularity | None = field(default=None, metadata=_h(
        "weight scale granularity: per tensor, per output channel, per C_in group (int8/fp8/w8a16: channel or "
        "tensor; w4a16/w4a8: group128/64/32); default: the precision's first"))
    act_granularity: ActGranularity = field(default="tensor", metadata=_h(
        "activation scales: tensor = static per-tensor (calibrated; TensorRT's INT8 GEMMs), token = dynamic "
        "per-token amax/qmax computed at run time (ViDiT-Q; int8/fp8/w4a8); overrides take a /token suffix"))
    weight_search: ScaleSearch = field(default="minmax", metadata=_h("clipping search for weight scales"))
    act_search: ScaleSearch = field(default="minmax", metadata=_h("clipping search for activation scales"))
    percentile: float = field(default=99.99, metadata=_h("percentile of |x| for the percentile search"))
    lp: float = field(default=2.0, metadata=_h("p of the Lp error minimised by the mse search (PTQ4DiT: 2.4)"))
    alpha: float = field(default=1.0, metadata=_h("SmoothQuant migration strength (the paper: 0.5; ModelOpt: 1.0)"))
    smooth_fc2: bool = field(default=True, metadata=_h("smoothquant: also smooth fc2 (after GELU) with a run-time Mul"))
    rotate_fc2: bool = field(default=False, metadata=_h(
        "rotate fc2's input (after GELU) by a block-diagonal normalized Hadamard, folded into fc2's weight "
        "before any balancing, weight search, GPTQ or low-rank; activations are calibrated rotated"))
    rotate_block: int = field(default=512, metadata=_h(
        "largest Hadamard block of --rotate-fc2 (a power of two; each layer takes the largest power of two "
        "dividing its C_in, up to this)"))
    alpha_grid_step: float = field(default=0.05, metadata=_h("DiTAS alpha grid step over [0, 1]"))
    layers: list[str] = field(default_factory=lambda: list(DEFAULT_LAYERS),
                              metadata=_h("layer roles in each block to quantize"))
    overrides: list[str] = field(default_factory=list, metadata=_h(
        "per-layer precisions, comma-separated PATTERN=PRECISION[:GRANULARITY][/ACT_GRANULARITY] (fnmatch over layer names, later "
        "wins; fp16 = left unquantized), e.g. 'blocks.11.*=fp16,*.mlp.fc2=w8a16'"))
    # weight-side refinements, after any method, on the balanced weight W diag(b) (calibrate/weights.py)
    gptq: bool = field(default=False, metadata=_h(
        "GPTQ weight rounding (Hessian of the balanced layer inputs, all calibration timesteps pooled)"))
    gptq_block: int = field(default=128, metadata=_h("GPTQ lazy-batch block (columns)"))
    gptq_damp: float = field(default=0.01, metadata=_h("GPTQ damping, a fraction of mean(diag H)"))
    gptq_act_order: bool = field(default=False, metadata=_h("GPTQ: quantize columns by decreasing diag(H)"))
    lowrank_rank: int = field(default=0, metadata=_h(
        "DiTAS training-free low-rank branch rank (0: none): W ~ quant(W - L R) + L R, L R in FP16"))
    lowrank_iters: int = field(default=10, metadata=_h("low-rank: alternations of quantize / rank-r SVD"))
    # block reconstruction (BRECQ + AdaRound + LSQ activation steps, calibrate/recon.py), after the above
    reconstruct: bool = field(default=False, metadata=_h(
        "block reconstruction: per DiT block, AdaRound weight rounding (+ learned activation steps) fitted to the "
        "FP block's output on the calibration set"))
    recon_iters: int = field(default=1000, metadata=_h("reconstruction: Adam iterations per block"))
    recon_lr: float = field(default=1e-2, metadata=_h(
        "reconstruction: learning rate of the AdaRound variables (AdaRound: 1e-3 over 10k+ iterations; larger for "
        "fewer, so V can reach the ends of the rectified sigmoid)"))
    recon_act_lr: float = field(default=1e-3, metadata=_h(
        "reconstruction: learning rate of the log activation steps"))
    recon_batch: int = field(default=32, metadata=_h("reconstruction: calibration rows per iteration"))
    recon_act_steps: bool = field(default=False, metadata=_h(
        "reconstruction: also learn the INT8 activation steps (LSQ); off by default: on the tiny model it lowered "
        "the held-out-timestep SQNR (docs/calibration.md)"))
    recon_reg: float = field(default=1.0, metadata=_h(
        "reconstruction: weight of the rounding regularizer (its mean over weights, against the relative output "
        "MSE); tiny model, 200 iterations: 0.01 / 0.1 / 1 gave +1.06 / +1.17 / +1.26 dB held-out SQNR"))
    recon_warmup: float = field(default=0.2, metadata=_h(
        "reconstruction: fraction of iterations without the regularizer before beta anneals 20 -> 2"))
    sample_tokens: int = field(default=64, metadata=_h("tokens per layer and timestep kept for searches"))
    hist_bins: int = field(default=2048, metadata=_h("bins of the |x| histogram per layer"))
    batch_size: int = field(default=64, metadata=_h("rows per calibration forward"))
    device: str = field(default="cpu", metadata=_h("torch device"))
    progress: bool = field(default=True, metadata=_h("progress bars"))

    def __post_init__(self) -> None:
        check_finite_fields(self)  # percentile, lp, alpha, alpha_grid_step
        if self.precision not in formats.QUANTIZED_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(formats.QUANTIZED_PRECISIONS)} "
                             f"(fp32/fp16 take no calibration), got {self.precision!r}")
        p = formats.get_precision(self.precision)
        if self.weight_granularity is None:
            self.weight_granularity = p.default_granularity
        if self.weight_granularity not in p.granularities:
            raise ValueError(f"precision {self.precision} takes weight granularity {', '.join(p.granularities)}; "
                             f"got {self.weight_granularity!r}")
        formats.check_act_granularity(self.precision, self.act_granularity)
        for text in self.overrides:
            formats.parse_override(text)  # syntax and precision names; patterns are matched at calibration
        if self.rotate_block < 2 or self.rotate_block & (self.rotate_block - 1):
            raise ValueError(f"rotate_block must be a power of two >= 2, got {self.rotate_block}")
        if not 0 < self.percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")
        if self.hist_bins < 2 or self.hist_bins & (self.hist_bins - 1):
            raise ValueError(f"hist_bins must be a power of two (exact histogram merges), got {self.hist_bins}")
        if self.lowrank_rank < 0 or self.lowrank_iters < 1 or self.gptq_block < 1 or self.gptq_damp < 0:
            raise ValueError("lowrank_rank must be >= 0, lowrank_iters and gptq_block >= 1, gptq_damp >= 0")
        if self.recon_iters < 1 or self.recon_batch < 1:
            raise ValueError("recon_iters and recon_batch must be >= 1")
        if self.recon_lr <= 0 or self.recon_act_lr <= 0 or self.recon_reg < 0:
            raise ValueError("recon_lr and recon_act_lr must be > 0, recon_reg >= 0")
        if not 0 <= self.recon_warmup < 1:
            raise ValueError("recon_warmup must be in [0, 1)")
        unknown = [r for r in self.layers if r not in DEFAULT_LAYERS]
        if unknown:
            raise ValueError(f"unknown layer roles {unknown}; known: {DEFAULT_LAYERS}")

    # -- derived --------------------------------------------------------------------------------
    @property
    def default_layer(self) -> "LayerPrecision":
        """A layer with no override: the default precision and granularity."""
        return LayerPrecision(self.precision, self.weight_granularity, self.act_granularity)

    @property
    def wfmt(self) -> str:
        return self.default_layer.wfmt

    @property
    def afmt(self) -> str:
        return self.default_layer.afmt

    def layer_precisions(self, names: list[str]) -> dict[str, "LayerPrecision"]:
        """Each named layer's precision after the overrides (``fp16`` ones: left unquantized)."""
        resolved = formats.resolve_layer_precisions(names, self.precision, self.weight_granularity, self.overrides)
        acts = formats.resolve_act_granularities(names, self.precision, self.act_granularity, self.overrides)
        return {n: LayerPrecision(p, g, acts[n]) for n, (p, g) in resolved.items()}


@dataclass(frozen=True)
class LayerPrecision:
    """One layer's precision and weight granularity, as the methods and ``assemble_recipe`` use it."""

    precision: str
    weight_granularity: str | None
    act_granularity: str = "tensor"  # "token": dynamic per-token activation scale (no calibrated act_scale)

    @property
    def quantized(self) -> bool:
        return formats.get_precision(self.precision).quantized

    @property
    def wfmt(self) -> str:
        return formats.get_precision(self.precision).weight_format

    @property
    def afmt(self) -> str:
        return formats.get_precision(self.precision).act_format

    @property
    def granularity(self) -> tuple[str, int | None]:
        return formats.parse_granularity(self.weight_granularity)
