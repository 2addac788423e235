"""Model, diffusion, sampler and denoiser backends: everything needed to sample."""
