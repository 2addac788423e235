import pytest
import torch

from dtq.runtime.denoiser import TorchDenoiser
from dtq.runtime.diffusion import GaussianDiffusion
from dtq.runtime.sampler import guided_output, sample


def _run(model, sampler, seed, steps=8, eta=0.0, **kw):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    return sample(TorchDenoiser(model), GaussianDiffusion.dit(steps), noise, torch.tensor([1, 2, 3]),
                  sampler=sampler, eta=eta, cfg_scale=2.0, null_class=10, generator=gen, **kw)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_same_seed_same_samples(small_model, sampler):
    a, b = _run(small_model, sampler, 0), _run(small_model, sampler, 0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, _run(small_model, sampler, 1))


def test_ddim_eta0_ignores_step_noise(small_model):
    d = GaussianDiffusion.dit(8)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1])
    outs = [sample(TorchDenoiser(small_model), d, noise, y, sampler="ddim", eta=0.0,
                   generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert torch.equal(outs[0], outs[1])
    stochastic = [sample(TorchDenoiser(small_model), d, noise, y, sampler="ddim", eta=1.0,
                         generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert not torch.allclose(stochastic[0], stochastic[1])


def test_guidance_mix_formula():
    cond, uncond = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    mixed = guided_output(torch.cat([cond, uncond]), 4.0, in_channels=4)
    assert torch.allclose(mixed[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]))
    assert torch.equal(mixed[:, 4:], cond[:, 4:])  # variance channels: conditional


def test_original_dit_guidance_differs_only_in_fourth_channel(small_model):
    calls = []
    a = _run(small_model, "ddpm", 0, guidance_channels="all", on_step=lambda s: calls.append(s))
    b = _run(small_model, "ddpm", 0, guidance_channels="dit")
    assert len(calls) == 8 and calls[0].x.shape[0] == 6  # guidance doubled the batch
    # one step of each from the same denoiser output: only channel 3 differs
    out = calls[3].output
    ma, mb = guided_output(out, 2.0, 4, "all"), guided_output(out, 2.0, 4, "dit")
    diff = (ma - mb).abs().amax(dim=(0, 2, 3))
    assert diff[3] > 1e-3 and diff[:3].max() == 0 and diff[4:].max() == 0
    assert not torch.allclose(a[:, 3], b[:, 3])  # end to end the 4th channel's samples differ


def test_on_step_sees_original_timesteps(small_model):
    seen = []
    _run(small_model, "ddim", 0, steps=5, on_step=lambda s: seen.append(s.timestep))
    assert seen == [999, 749, 500, 250, 0]


def test_guidance_needs_null_class(small_model):
    with pytest.raises(ValueError, match="null class"):
        sample(TorchDenoiser(small_model), GaussianDiffusion.dit(2), torch.randn(1, 4, 8, 8), torch.tensor([0]), cfg_scale=3.0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_schedule_reaches_the_device_once(small_model, sampler, monkeypatch):
    """The schedule's arrays and timestep map become tensors once per device, not at every step: on a GPU
    each conversion is a copy from host memory that waits for the step's forward (so the host could not
    enqueue the next step meanwhile). Counted here through torch.from_numpy / torch.tensor on the CPU; the
    samples are those of the per-step conversion (the same float64 values, indexed, then cast)."""
    import numpy as np

    d = GaussianDiffusion.dit(8)
    calls = {"from_numpy": 0, "tensor": 0}
    real_from_numpy, real_tensor = torch.from_numpy, torch.tensor

    def from_numpy(a):
        calls["from_numpy"] += 1
        return real_from_numpy(a)

    def tensor(*a, **k):
        calls["tensor"] += 1
        return real_tensor(*a, **k)

    monkeypatch.setattr(torch, "from_numpy", from_numpy)
    monkeypatch.setattr(torch, "tensor", tensor)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    y = real_tensor([1, 2, 3])
    out = sample(TorchDenoiser(small_model), d, noise, y, sampler=sampler, cfg_scale=2.0, null_class=10, generator=gen)
    first = dict(calls)
    assert 0 < first["from_numpy"] <= 10 and first["tensor"] <= 2, first  # the arrays used, not 8 steps x them
    sample(TorchDenoiser(small_model), d, noise, y, sampler=sampler, cfg_scale=2.0, null_class=10,
           generator=torch.Generator().manual_seed(0))
    assert calls == first, calls  # a second run on the same device converts nothing
    # the values: the per-step conversion's, exactly
    t = real_tensor([7, 3, 0])
    for name in ("posterior_mean_coef1", "posterior_log_variance_clipped", "log_betas", "log_variance_large"):
        want = real_from_numpy(getattr(d, name))[t].to(torch.float32).view(-1, 1, 1, 1)
        assert torch.equal(d._extract(name, t, noise), want), name
    assert np.array_equal(d.log_variance_large, np.log(np.append(d.posterior_variance[1], d.betas[1:])))
    assert torch.isfinite(out).all()
