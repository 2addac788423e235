"""Gaussian diffusion as DiT trains and samples it: 1000-step linear betas, respacing, DDPM with
learned-range variance, DDIM, and the hybrid (MSE + VLB) training loss.

All schedule arithmetic is float64 (as in the original code) and cast at use. Timesteps given to
``step_*`` are indices into the respaced schedule; the denoiser sees ``timestep_map[i]``, the
original 0..999 timestep, so one trained model serves every respacing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DiT's linear schedule, rescaled so that any step count spans the same noise range."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Evenly spaced original timesteps kept when respacing to ``steps`` (DiT's single section)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return [0]
    stride = (num_timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


@dataclass
class StepOutput:
    sample: torch.Tensor  # x_{t-1}
    pred_xstart: torch.Tensor
    eps: torch.Tensor


class GaussianDiffusion:
    """A (possibly respaced) discrete diffusion schedule with its posterior coefficients."""

    def __init__(self, betas: np.ndarray, timestep_map: list[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be 1-D and in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = list(timestep_map) if timestep_map is not None else list(range(len(betas)))
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the first posterior variance is 0: clip the log with the next one, as DiT does
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(betas) > 1 else np.array([np.log(betas[0])])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # DiT's fixed "large" variance (models without learned sigma)
        self.log_variance_large = (np.log(np.append(self.posterior_variance[1], betas[1:])) if len(betas) > 1
                                   else self.log_betas)
        # the schedule's arrays (and timestep map) on each device they were used on: made once, as a copy from
        # host memory per sampling step waits for the GPU (a non-blocking copy from pageable memory is not)
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def dit(cls, steps: int | None = None, num_timesteps: int = 1000) -> "GaussianDiffusion":
        """DiT's schedule, respaced to ``steps`` (None: all 1000)."""
        base = cls(linear_betas(num_timesteps))
        return base if steps is None or steps == num_timesteps else base.respace(steps)

    def respace(self, steps: int) -> "GaussianDiffusion":
        keep = set(space_timesteps(self.num_timesteps, steps))
        new_betas, timestep_map, last = [], [], 1.0
        for i, alpha_cumprod in enumerate(self.alphas_cumprod):
            if i in keep:
                new_betas.append(1 - alpha_cumprod / last)
                last = alpha_cumprod
                timestep_map.append(self.timestep_map[i])
        return GaussianDiffusion(np.array(new_betas), timestep_map)

    # -- helpers ----------------------------------------------------------------------------------
    def _device_array(self, name: str, device: torch.device) -> torch.Tensor:
        """The schedule's array ``name`` (float64; ``timestep_map``: int64) on ``device``, made once."""
        key = (name, device)
        if key not in self._on_device:
            if name == "timestep_map":
                self._on_device[key] = torch.tensor(self.timestep_map, dtype=torch.long).to(device)
            else:
                self._on_device[key] = torch.from_numpy(getattr(self, name)).to(device)
        return self._on_device[key]

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Array ``name`` at timesteps ``t``, float32, shaped to broadcast over ``like``."""
        out = self._device_array(name, like.device)[t.long()].to(torch.float32)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original (0..999) timesteps that the denoiser is conditioned on."""
        return self._device_array("timestep_map", t.device)[t.long()]

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        return mean, self._extract("posterior_variance", t, x_t), self._extract("posterior_log_variance_clipped", t, x_t)

    def predict_xstart_from_eps(self, x_t, t, eps):
        return self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool):
        """Mean, log-variance and x0 of p(x_{t-1} | x_t) from a (eps[, v]) model output.

        With twice the input's channels the second half is the learned-range interpolation
        ``v`` in [-1, 1] between log(beta_t) and the clipped posterior log-variance."""
        c = x_t.shape[1]
        model_output = model_output.float()
        if model_output.shape[1] == 2 * c:
            eps, var_values = model_output[:, :c], model_output[:, c:]
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        elif model_output.shape[1] == c:
            # fixed "large" variance, as DiT uses for models without learned sigma
            eps = model_output
            log_variance = self._extract("log_variance_large", t, x_t)
        else:
            raise ValueError(f"model output has {model_output.shape[1]} channels for a {c}-channel input")
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_xstart, x_t, t)
        return mean, log_variance, pred_xstart, eps

    # -- sampling steps -----------------------------------------------------------------------------
    def ddpm_step(self, model_output, x_t, t, noise, clip_denoised: bool = False) -> StepOutput:
        mean, log_variance, pred_xstart, eps = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        nonzero = (t != 0).float().view(-1, *([1] * (x_t.ndim - 1)))
        return StepOutput(mean + nonzero * torch.exp(0.5 * log_variance) * noise, pred_xstart, eps)

    def ddim_step(self, model_output, x_t, t, noise, eta: float = 0.0, clip_denoised: bool = False) -> StepOutput:
        _, _, pred_xstart, _ = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        eps = self.predict_eps_from_xstart(x_t, t, pred_xstart)  # re-derived after any clipping
        alpha_bar = self._extract("alphas_cumprod", t, x_t)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x_t)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (x_t.ndim - 1)))
        return StepOutput(mean + nonzero * sigma * noise, pred_xstart, eps)

    # -- training ------------------------------------------------------------------------------------
    def training_losses(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                        t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sample hybrid loss: MSE on eps + the VLB term that trains the learned variance
        (with the mean detached, as in improved-DDPM / DiT). Pixel data must lie in [-1, 1]."""
        c = x_t.shape[1]
        eps = model_output[:, :c]
        mse = ((noise - eps.float()) ** 2).mean(dim=tuple(range(1, x_t.ndim)))
        if model_output.shape[1] == c:
            return mse
        frozen = torch.cat([eps.detach(), model_output[:, c:]], dim=1)
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        mean, log_var, _, _ = self.p_mean_variance(frozen, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=tuple(range(1, x_t.ndim))) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var)
        nll = nll.mean(dim=tuple(range(1, x_t.ndim))) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl) * self.num_timesteps / 1000.0
        return mse + vb


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of 8-bit data in [-1, 1] under a Gaussian discretised to its bins."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))
