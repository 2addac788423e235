import numpy as np
import pytest
import torch

from dtq.runtime.diffusion import GaussianDiffusion, linear_betas, space_timesteps


def test_linear_betas_and_respacing():
    betas = linear_betas(1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02) and len(betas) == 1000
    steps = space_timesteps(1000, 100)
    assert len(steps) == 100 and steps[0] == 0 and steps[-1] == 999
    assert steps[:4] == [0, 10, 20, 30]  # round(i * 999/99)
    assert space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(1000, 0)


@pytest.mark.parametrize("steps", [1000, 250, 100, 50, 7])
def test_respaced_schedule_keeps_alphas_cumprod(steps):
    base = GaussianDiffusion.dit()
    d = GaussianDiffusion.dit(steps)
    kept = space_timesteps(1000, steps)
    assert d.timestep_map == kept
    # respacing must keep the marginal q(x_t | x_0) at every kept timestep
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)


@pytest.mark.parametrize("steps", [1000, 100])
def test_posterior_against_bayes_rule(steps):
    """q(x_{t-1} | x_t, x_0) computed independently as a product of two Gaussians."""
    d = GaussianDiffusion.dit(steps)
    abar = d.alphas_cumprod
    abar_prev = np.append(1.0, abar[:-1])
    alpha = abar / abar_prev
    beta = 1 - alpha
    t = np.arange(1, d.num_timesteps)  # t = 0 has a degenerate (zero-variance) posterior
    precision = 1 / (1 - abar_prev[t]) + alpha[t] / beta[t]
    np.testing.assert_allclose(d.posterior_variance[t], 1 / precision, rtol=1e-9)
    np.testing.assert_allclose(d.posterior_mean_coef1[t], np.sqrt(abar_prev[t]) / (1 - abar_prev[t]) / precision, rtol=1e-9)
    np.testing.assert_allclose(d.posterior_mean_coef2[t], np.sqrt(alpha[t]) / beta[t] / precision, rtol=1e-9)
    # the clipped log variance replaces the t=0 value with the t=1 value
    assert d.posterior_log_variance_clipped[0] == pytest.approx(np.log(d.posterior_variance[1]))


def test_learned_range_variance_endpoints():
    d = GaussianDiffusion.dit(50)
    x = torch.zeros(2, 1, 4, 4)
    t = torch.tensor([10, 10])
    for v, expected in ((1.0, np.log(d.betas[10])), (-1.0, d.posterior_log_variance_clipped[10])):
        out = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        _, log_var, _, _ = d.p_mean_variance(out, x, t, clip_denoised=False)
        assert torch.allclose(log_var, torch.full_like(x, float(expected)), atol=1e-6)


class OracleDenoiser:
    """The exact eps for data that is a single point x0: any correct sampler must return x0."""

    def __init__(self, x0, diffusion_full, learn_sigma=True):
        self.x0, self.abar, self.learn_sigma = x0, torch.from_numpy(diffusion_full.alphas_cumprod), learn_sigma

    def __call__(self, x, t, y):
        abar = self.abar[t].float().view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if self.learn_sigma else eps


@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("ddim", 50), ("ddim", 1000), ("ddpm", 10)])
def test_oracle_denoiser_recovers_data_point(sampler, steps):
    from dtq.runtime.sampler import sample

    x0 = torch.rand(1, 2, 4, 4) * 1.6 - 0.8
    oracle = OracleDenoiser(x0, GaussianDiffusion.dit())
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    out = sample(oracle, GaussianDiffusion.dit(steps), noise, torch.zeros(3, dtype=torch.long), sampler=sampler,
                 generator=torch.Generator().manual_seed(2))
    assert (out - x0).abs().max() < 1e-3


def test_hybrid_loss_is_finite_and_trains_variance():
    d = GaussianDiffusion.dit()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    out = torch.cat([noise, torch.zeros_like(x0)], 1).requires_grad_(True)
    loss = d.training_losses(out, x0, x_t, t, noise)
    assert torch.isfinite(loss).all() and loss.shape == (4,)
    loss.sum().backward()
    assert out.grad[:, 1:].abs().sum() > 0  # the VLB term reaches the variance channel
    assert out.grad[:, :1].abs().max() < 1e-6  # perfect eps: the MSE gradient vanishes, the VLB's is detached
