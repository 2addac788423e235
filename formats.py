"""The precision table: every quantization format dtq knows, owned once (stdlib only, so engines/
and the command-line tools import it without torch).

A *precision* names a (weight format, activation format) pair with the weight granularities it
takes, the smallest ai.onnx opset its Q/DQ needs, and what TensorRT does with it. Calibration
offers exactly the quantized precisions below, export writes them (per layer, so mixed recipes
work), the quantized PyTorch engine has one engine layer per precision (runtime/qengine.py), and
``dtq-build-engine`` refuses up front what TensorRT cannot build.

Layer roles: the four Linears of a DiT block that dtq quantizes, and where each role's balancing
vector can fold (METHODS.md "Folding"): into the adaLN shift/scale rows (qkv, fc1), the V rows of
qkv (proj), or a run-time ``Mul`` (any role; fc2's only place, after the GELU).
"""

from __future__ import annotations

from dataclasses import dataclass

# -- formats ----------------------------------------------------------------------------------------
INT8, INT4, FP8_E4M3, NONE = "int8", "int4", "fp8_e4m3", "none"
FORMATS = (INT8, INT4, FP8_E4M3, NONE)
WEIGHT_FORMATS = (INT8, INT4, FP8_E4M3, NONE)
ACT_FORMATS = (INT8, FP8_E4M3, NONE)  # INT4 is weight-only

# weight scale granularity as the user names it; in a recipe layer: ("group", 128) etc.
GROUP_SIZES = (32, 64, 128)
GRANULARITIES = ("tensor", "channel", *(f"group{g}" for g in GROUP_SIZES))

# activation scale granularity: "tensor" = one static scale calibrated per tensor (TensorRT's rule);
# "token" = ViDiT-Q's dynamic per-token scale, amax(|x| over channels) / qmax computed at run time
ACT_GRANULARITIES = ("tensor", "token")
_ACT_GRANS = ACT_GRANULARITIES
TOKEN_MIN_OPSET = 21  # the per-token Q/DQ is blocked quantization (block = the channels)
# what TensorRT does with per-token activations (measured with TensorRT-RTX 1.7.1; docs/export.md)
TOKEN_TENSORRT_NOTE = (
    "per-token dynamic activations compute their Q/DQ scale in the graph (ReduceMax(Abs(x))/qmax); TensorRT "
    "fuses only constant-scale Q/DQ into INT8/FP8 GEMMs. TensorRT-RTX 1.7.1 parses such a graph and its builder "
    "fails (Myelin CHECK(is_constant()), as for w4a8). For TensorRT calibrate with --act-granularity tensor "
    "(static per-tensor scales); ONNX Runtime and the quantized PyTorch engine run per-token activations.")

# what TensorRT (>= 10, and TensorRT-RTX) does with a precision's Q/DQ graph
TRT_NATIVE = "native"  # quantized GEMMs (W8A8) or TensorRT's weight-only GEMMs (W4A16, W8A16)
TRT_REFUSED = "refused"  # the builder fails: deploy as ``tensorrt_fallback`` instead


@dataclass(frozen=True)
class Precision:
    name: str
    weight_format: str
    act_format: str
    granularities: tuple[str, ...]  # allowed weight granularities, the first is the default
    min_opset: int  # smallest ai.onnx opset of its Q/DQ (FP8: 19, blocked INT4: 21)
    tensorrt: str = TRT_NATIVE
    tensorrt_fallback: str | None = None  # the precision TensorRT deploys a refused one as
    tensorrt_note: str = ""  # what dtq-export / dtq-build-engine print about it
    summary: str = ""
    act_granularities: tuple[str, ...] = ("tensor",)  # the first is the default; token: dynamic per row

    @property
    def quantized(self) -> bool:
        return self.weight_format != NONE

    @property
    def default_granularity(self) -> str | None:
        return self.granularities[0] if self.granularities else None

    @property
    def weight_only(self) -> bool:
        return self.quantized and self.act_format == NONE


_W4A8_NOTE = (
    "TensorRT has no INT4 x INT8 GEMM (its INT4 is weight-only with FP16/BF16 activations; NVIDIA's "
    "W4A8 is INT4 x FP8 and only in TensorRT-LLM). TensorRT-RTX 1.7.1 parses a W4A8 graph and its builder "
    "fails (Myelin CHECK(is_constant())). For TensorRT, export the same recipe with --precision w4a16: "
    "the weights are identical and the activation Q/DQ is dropped. ONNX Runtime and the quantized "
    "PyTorch engine run W4A8 as calibrated.")
_CH = ("channel", "tensor")
_GROUPS = tuple(f"group{g}" for g in (128, 64, 32))

PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", NONE, NONE, (), 18, summary="float32 graph, no recipe"),
    Precision("fp16", NONE, NONE, (), 18, summary="float16 graph, no recipe; as an override: layer left unquantized"),
    Precision("int8", INT8, INT8, _CH, 19, act_granularities=_ACT_GRANS,
              summary="W8A8 INT8: per-channel/tensor weights, static per-tensor (or dynamic per-token) activations"),
    Precision("fp8", FP8_E4M3, FP8_E4M3, _CH, 19, act_granularities=_ACT_GRANS,
              summary="W8A8 FP8 E4M3 (TensorRT runs it on Ada/Hopper+)"),
    Precision("w8a16", INT8, NONE, _CH, 19, summary="INT8 weight-only, FP16 activations"),
    Precision("w4a16", INT4, NONE, _GROUPS, 21, summary="INT4 weight-only, blocked along C_in"),
    Precision("w4a8", INT4, INT8, _GROUPS, 21, tensorrt=TRT_REFUSED, tensorrt_fallback="w4a16",
              tensorrt_note=_W4A8_NOTE, act_granularities=_ACT_GRANS,
              summary="INT4 blocked weights x INT8 activations"),
)}
FP_PRECISIONS = tuple(n for n, p in PRECISIONS.items() if not p.quantized)
QUANTIZED_PRECISIONS = tuple(n for n, p in PRECISIONS.items() if p.quantized)
UNQUANTIZED = "fp16"  # an override's name for "leave this layer in the graph's float type"


def get_precision(name: str) -> Precision:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}") from None


def precision_of(weight_format: str, act_format: str) -> str:
    """The precision name of a recipe layer's (weight, activation) formats; ``fp16`` for an
    unquantized layer. A pair no precision has is an error listing the valid ones."""
    if weight_format == NONE and act_format == NONE:
        return UNQUANTIZED
    for p in PRECISIONS.values():
        if p.quantized and (p.weight_format, p.act_format) == (weight_format, act_format):
            return p.name
    valid = ", ".join(f"{p.name} ({p.weight_format} weights / {p.act_format} activations)"
                      for p in PRECISIONS.values() if p.quantized)
    raise ValueError(f"no precision has {weight_format} weights with {act_format} activations; valid: {valid}")


def parse_granularity(text: str) -> tuple[str, int | None]:
    """``group128`` -> ``("group", 128)``, ``channel`` -> ``("channel", None)``."""
    if text not in GRANULARITIES:
        raise ValueError(f"unknown weight granularity {text!r}; known: {', '.join(GRANULARITIES)}")
    return ("group", int(text[5:])) if text.startswith("group") else (text, None)


def granularity_name(kind: str, group_size: int | None = None) -> str:
    """The inverse of :func:`parse_granularity` (a recipe layer's fields -> ``group128``)."""
    return f"group{group_size}" if kind == "group" else kind


def check_granularity(precision: str, granularity: str) -> None:
    p = get_precision(precision)
    if not p.quantized:
        return
    if granularity not in p.granularities:
        raise ValueError(f"precision {precision} takes weight granularity {' / '.join(p.granularities)}, "
                         f"not {granularity!r}")


def check_act_granularity(precision: str, act_granularity: str) -> None:
    """``token`` (dynamic per-token activation scales) needs a precision with quantized activations."""
    if act_granularity not in ACT_GRANULARITIES:
        raise ValueError(f"unknown activation granularity {act_granularity!r}; known: {', '.join(ACT_GRANULARITIES)}")
    p = get_precision(precision)
    if act_granularity not in p.act_granularities:
        takes = [n for n, q in PRECISIONS.items() if act_granularity in q.act_granularities]
        raise ValueError(f"precision {precision} has no quantized activations to scale per {act_granularity} "
                         f"(activation granularity {act_granularity!r} needs one of {', '.join(takes)})")


def min_opset(precisions) -> int:
    """The opset a graph holding layers of these precisions needs (the largest minimum)."""
    return max((get_precision(p).min_opset for p in precisions), default=PRECISIONS["fp16"].min_opset)


def tensorrt_refusals(precisions) -> list[str]:
    """One message per precision in ``precisions`` that TensorRT cannot build."""
    return [f"{p}: {get_precision(p).tensorrt_note}" for p in sorted(set(precisions))
            if get_precision(p).tensorrt == TRT_REFUSED]


def describe() -> str:
    """The table as text (``--help`` epilogs, docs)."""
    rows = []
    for p in PRECISIONS.values():
        gran = "/".join(p.granularities) or "-"
        trt = p.tensorrt if p.tensorrt_fallback is None else f"{p.tensorrt} (deploy as {p.tensorrt_fallback})"
        agran = "/".join(p.act_granularities) if p.act_format != NONE else "-"
        rows.append(f"  {p.name:6s} w {p.weight_format:8s} a {p.act_format:8s} {gran:24s} act {agran:12s} opset>={p.min_opset}  "
                    f"TensorRT: {trt}")
    return "\n".join(rows)


# -- layer roles and balancing folds ----------------------------------------------------------------
ROLES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
# cross-attention of text-conditioned models (PixArt): queries from the image tokens, keys/values from
# the text tokens, the output projection; a DiT has none (runtime/adapters.py)
CROSS_ROLES = ("cross.q", "cross.kv", "cross.proj")
ALL_ROLES = (*ROLES, *CROSS_ROLES)
FOLDS = ("adaLN", "v", "runtime")
# where each role's balancing vector may fold; the first is where methods fold it (free of run-time cost
# where possible). fc2's input comes out of a GELU: only a run-time Mul reaches it.
ROLE_FOLDS = {"attn.qkv": ("adaLN", "runtime"), "mlp.fc1": ("adaLN", "runtime"),
              "attn.proj": ("v", "runtime"), "mlp.fc2": ("runtime",)}
FOLD_BY_ROLE = {role: folds[0] for role, folds in ROLE_FOLDS.items()}


def layer_role(name: str) -> str:
    """``blocks.3.attn.qkv`` -> ``attn.qkv`` (other names are returned unchanged)."""
    parts = name.split(".")
    return ".".join(parts[2:]) if len(parts) >= 4 and parts[0] == "blocks" else name


def layer_names(depth: int, roles=ROLES) -> list[str]:
    """``blocks.N.<role>`` for every block, in model order."""
    return [f"blocks.{i}.{r}" for i in range(depth) for r in roles]


# -- per-layer overrides ------------------------------------------------------------------------------
def _split_override(text: str) -> tuple[str, str, str | None, str | None]:
    """``PATTERN=PRECISION[:GRANULARITY][/ACT_GRANULARITY]`` -> its four parts, checked."""
    pattern, sep, value = text.partition("=")
    value, slash, act = value.partition("/")
    precision, _, gran = value.partition(":")
    if not sep or not pattern or not precision or (slash and not act):
        raise ValueError(f"override {text!r}: expected PATTERN=PRECISION[:GRANULARITY][/ACT_GRANULARITY], "
                         f"e.g. 'blocks.11.*=fp16' or '*.mlp.fc2=w4a8:group64/token'")
    if precision not in PRECISIONS or precision == "fp32":
        choices = ", ".join(n for n in PRECISIONS if n != "fp32")
        raise ValueError(f"override {text!r}: unknown precision {precision!r}; choices: {choices} "
                         f"(fp16: leave the layer unquantized)")
    if gran:
        if precision == UNQUANTIZED:
            raise ValueError(f"override {text!r}: fp16 takes no granularity")
        check_granularity(precision, gran)
    if act:
        try:
            check_act_granularity(precision, act)
        except ValueError as exc:
            raise ValueError(f"override {text!r}: {exc}") from None
    return pattern, precision, gran or None, act or None


def parse_override(text: str) -> tuple[str, str, str | None]:
    """``PATTERN=PRECISION[:GRANULARITY][/ACT_GRANULARITY]`` -> (pattern, precision, weight granularity
    or None); the activation granularity is :func:`resolve_act_granularities`' business."""
    return _split_override(text)[:3]


def resolve_act_granularities(names: list[str], default: str, act_granularity: str,
                              overrides: list[str]) -> dict[str, str]:
    """Each layer's activation granularity ("tensor" / "token") from the default precision's and
    the overrides' ``/ACT_GRANULARITY`` suffix (later wins). A layer whose precision has no
    quantized activation is "tensor" (nothing to scale); an override without a suffix keeps the
    default granularity where its precision takes it."""
    import fnmatch

    def pick(precision: str, act: str | None) -> str:
        takes = get_precision(precision).act_granularities
        if act is None:
            act = act_granularity
        return act if act in takes else "tensor"

    check_act_granularity(default, act_granularity)
    out = {n: pick(default, None) for n in names}
    for text in overrides:
        pattern, precision, _, act = _split_override(text)
        for n in fnmatch.filter(names, pattern):
            out[n] = pick(precision, act)
    return out


def resolve_layer_precisions(names: list[str], default: str, granularity: str | None,
                             overrides: list[str]) -> dict[str, tuple[str, str | None]]:
    """Each layer's (precision, granularity) from a default and ``PATTERN=PRECISION[:GRAN]``
    overrides (fnmatch over layer names; later overrides win). An override without a granularity
    keeps ``granularity`` where its precision takes it, else uses the precision's default. A
    pattern that matches no layer is an error (a typo would silently quantize what it meant to
    keep)."""
    import fnmatch

    def pick(precision: str, gran: str | None) -> tuple[str, str | None]:
        p = get_precision(precision)
        if not p.quantized:
            return precision, None
        if gran is None:
            gran = granularity if granularity in p.granularities else p.default_granularity
        return precision, gran

    check_granularity(default, granularity or get_precision(default).default_granularity)
    out = {n: pick(default, granularity) for n in names}
    for text in overrides:
        pattern, precision, gran = parse_override(text)
        hits = fnmatch.filter(names, pattern)
        if not hits:
            roles = sorted({layer_role(n) for n in names})
            raise ValueError(f"override {text!r}: {pattern!r} matches no quantizable layer (they are "
                             f"blocks.N.ROLE with ROLE in {roles})")
        for n in hits:
            out[n] = pick(precision, gran)
    return out
