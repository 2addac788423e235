"""The fused FP8 GEMM epilogues that ``cute_bench.py`` times, as quack-kernels epilogue functions.

Module-level on purpose: quack fingerprints each function's source for its kernel cache and finds it
again by module and name. Imported only on a GPU machine with quack-kernels installed; each function
is called once per accumulator element (float32) inside the GEMM's epilogue.
"""

import cutlass
import cutlass.cute as cute
from quack.activation import gelu_tanh_approx
from quack.epilogue.frontend import gemm_epilogue

E4M3_MAX = 448.0


@gemm_epilogue()
def scale_bias(acc, scale_n, bias_n):
    """A dequantizing linear: ``acc * (a_scale * w_scale[n]) + bias[n]``."""
    return {"D": acc * scale_n + bias_n}


@gemm_epilogue()
def gelu_quant(acc, scale_n, bias_n, qmul_n):
    """fc1 -> GELU(tanh) -> fc2's static E4M3 input quantization (``qmul`` = fc2's balancing Mul over
    its activation scale); saturated to +-448 before the E4M3 store."""
    y = gelu_tanh_approx(acc * scale_n + bias_n) * qmul_n
    return {"D": cute.arch.fmin(cute.arch.fmax(y, cutlass.Float32(-E4M3_MAX)), cutlass.Float32(E4M3_MAX))}


@gemm_epilogue()
def gate_residual(acc, scale_n, bias_n, gate, res):
    """``residual + gate[b, n] * (acc * scale[n] + bias[n])``, batched over images ``b``."""
    return {"D": res + gate * (acc * scale_n + bias_n)}
