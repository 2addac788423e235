"""PTQ4DiT: Channel-wise Salience Balancing with Spearman-guided Salience Calibration.

b_j = sqrt(s(X_j) / s(W_j)) where s(X) = sum_t eta_t s_t(X), eta = softmax_t(-rho_t) and
rho_t = spearman(s_t(X), s(W)): timesteps whose activation and weight salience are least
correlated weigh most. On qkv, proj, fc1 (the released code leaves fc2 alone); folds into
adaLN (qkv, fc1) and V (proj). Reconstruction (BRECQ/AdaRound) is not part of this method here.
"""

from __future__ import annotations

import numpy as np
import torch

from ..build import assemble_recipe, quantized_layers, weight_salience
from . import register

BALANCED = ("attn.qkv", "attn.proj", "mlp.fc1")
_EPS = 1e-5


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata 'average')."""
    a = np.asarray(a)
    sorter = np.argsort(a, kind="mergesort")
    inv = np.empty(sorter.size, dtype=np.intp)
    inv[sorter] = np.arange(sorter.size)
    s = a[sorter]
    obs = np.r_[True, s[1:] != s[:-1]]
    dense = obs.cumsum()[inv]
    count = np.r_[np.nonzero(obs)[0], len(obs)]
    return 0.5 * (count[dense] + count[dense - 1] + 1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = rankdata(a.double().numpy()), rankdata(b.double().numpy())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def ssc_weights(sx_per_t: torch.Tensor, sw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eta [T], rho [T]) for per-timestep activation saliences ``[T, C]`` and weight salience ``[C]``."""
    rho = torch.tensor([spearman(row, sw) for row in sx_per_t], dtype=torch.float64)
    return torch.softmax(-rho, dim=0), rho


def csb_balance(sx: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """b_j = sqrt(s(X_j) / s(W_j)): after balancing both saliences are sqrt(s(X_j) s(W_j))."""
    return torch.sqrt(sx.clamp_min(_EPS) / sw.clamp_min(_EPS))


@register("ptq4dit")
def ptq4dit(model, stats, config):
    roles = [r for r in config.layers if r in BALANCED]
    balances, rhos = {}, {}
    for name in quantized_layers(model, config, roles):
        sw = weight_salience(model, name)
        per_t = stats[name].channel_amax_per_t()
        eta, rho = ssc_weights(per_t, sw)
        sx = (eta[:, None].float() * per_t).sum(dim=0)
        balances[name] = csb_balance(sx, sw)
        rhos[name] = [round(float(r), 4) for r in rho]
    info = {"spearman_rho": rhos, "timesteps": stats[next(iter(balances))].timesteps if balances else []}
    return assemble_recipe(model, stats, config, "ptq4dit", balances, {"balanced": roles}, info=info)
