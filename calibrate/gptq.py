"""GPTQ (Frantar et al., 2023): weight rounding with second-order error feedback.

For a Linear with input ``X`` (``[tokens, C_in]``) GPTQ minimises ``|X W^T - X Q^T|^2`` column by
column: each column of ``W`` is quantized, and its error, weighted by the inverse Hessian
``H^-1`` (``H = X^T X``), is pushed onto the columns not yet quantized. This is the paper's
Algorithm 1: the Cholesky factor of ``H^-1`` (upper), lazy batch updates in blocks of ``block``
columns, damping ``damp * mean(diag H)``, optional act-order (columns by decreasing ``diag H``).

Scales are *static*: they are given (the method's search on the balanced weight), so group-wise
scales work with act-order unchanged ("static groups" in AutoGPTQ) and the result quantizes
exactly to the codes GPTQ chose with the recipe's ``weight_scale``.

``HessianCollector`` accumulates ``X^T X`` per layer with forward hooks over a ModelOpt-style
``forward_loop`` (the calibration set, all timesteps pooled): nothing grows with the data.
Under torchrun each rank sums its share of the batches and ``collect_hessians`` all-reduces the
sums. The sums are float64 (of each batch's float32 ``X^T X``), so summing in another order moves
them by ~1e-16 relative and the float32 Hessian GPTQ reads is the one a single process gets (in
the 2-rank test, bit for bit); with float32 sums a few GPTQ rounding decisions flipped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..runtime import quant
from ..runtime.distributed import SINGLE, DistContext
from ..runtime.rotation import rotated_input
from .data import ForwardLoop


class HessianCollector:
    """Context manager: ``X^T X`` (summed in float64) and the token count of each named Linear's input.

    The input is the one the quantizer sees: a ``QuantLinear`` with a run-time balancing ``Mul``
    (``input_mul``) is hooked *after* that multiply (and after an ``input_rotation``), so on
    ``balanced_model`` it is ``X / b`` (``(B X) / b`` for a rotated layer)."""

    def __init__(self, model: nn.Module, layer_names: list[str]):
        self.model = model
        self.names = list(layer_names)
        self.xtx: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {n: 0 for n in self.names}
        self._handles: list = []

    def __enter__(self) -> "HessianCollector":
        for name in self.names:
            mod = self.model.get_submodule(name)
            self._handles.append(mod.register_forward_pre_hook(lambda m, args, n=name: self._observe(n, m, args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def _observe(self, name: str, mod: nn.Module, x: torch.Tensor) -> None:
        mul = getattr(mod, "input_mul", None)
        x = rotated_input(mod, x.detach().float().reshape(-1, x.shape[-1]))
        if mul is not None:
            x = x * mul.float()
        xtx = (x.T @ x).double()
        prev = self.xtx.get(name)
        self.xtx[name] = xtx if prev is None else prev.add_(xtx)
        self.tokens[name] += x.shape[0]

    def hessians(self) -> dict[str, torch.Tensor]:
        """``H = X^T X / tokens`` per layer, float32 (the scale does not change GPTQ's result)."""
        return {n: (h / max(self.tokens[n], 1)).float() for n, h in self.xtx.items()}


def collect_hessians(model: nn.Module, forward_loop: ForwardLoop, layer_names: list[str],
                     shard: DistContext = SINGLE) -> dict[str, torch.Tensor]:
    """Run ``forward_loop(model)`` once with hooks: ``{layer: X^T X / tokens}`` on the model's device.
    ``shard``: the loop ran this rank's share of the batches; the sums are all-reduced."""
    with HessianCollector(model, layer_names) as c:
        forward_loop(model)
    if shard.active:
        _all_reduce_sums(model, c)
    return c.hessians()


def _all_reduce_sums(model: nn.Module, c: HessianCollector) -> None:
    """Sum every rank's ``X^T X`` and token counts (a rank that ran no batch sends zeros)."""
    device = next(model.parameters()).device
    for name in c.names:  # the same order on every rank
        n = model.get_submodule(name).in_features
        xtx = c.xtx.get(name)
        xtx = torch.zeros(n, n, dtype=torch.float64, device=device) if xtx is None else xtx
        dist.all_reduce(xtx)
        c.xtx[name] = xtx
    tokens = torch.tensor([c.tokens[n] for n in c.names], dtype=torch.long, device=device)
    dist.all_reduce(tokens)
    c.tokens = {n: int(v) for n, v in zip(c.names, tokens.tolist())}


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, fmt: str, granularity: str,
                  group_size: int | None = None, *, block: int = 128, damp: float = 0.01,
                  act_order: bool = False) -> torch.Tensor:
    """GPTQ's quantized weight, dequantized (``codes * scale``, ``[C_out, C_in]`` float32).

    ``scale`` is the weight scale in ``runtime.quant``'s layout for ``granularity``; so
    ``quant.quantize_weight(result, scale, ...)`` gives GPTQ's codes back exactly. Computes in the
    dtype of ``w`` if float64, else float32, on ``w``'s device."""
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.detach().to(dtype).clone()
    H = hessian.detach().to(W.device, dtype).clone()
    n_in = W.shape[1]
    S = quant.expand_weight_scale(scale.to(W.device, dtype), W.shape, granularity, group_size)
    S = S.expand_as(W).clone() if S.shape != W.shape else S.clone()
    dead = torch.diag(H) == 0  # a channel that never fires: any value is exact, take 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, S, H = W[:, perm], S[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, s = W1[:, i], S[:, i1 + i]
            q = quant.fake_quant(col, s, fmt).to(dtype)
            Q[:, i1 + i] = q
            err = (col - q) / h1[i, i]
            W1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]  # lazy batch update of the columns after the block
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.float()


def layer_output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """``|X W^T - X Wq^T|^2 / |X W^T|^2``: what GPTQ minimises, relative."""
    ref = x.double() @ w.double().T
    return float((ref - x.double() @ wq.double().T).pow(2).sum() / ref.pow(2).sum())
