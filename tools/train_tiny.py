"""Train the built-in tiny class-conditional DiT on Fashion-MNIST (pixel space, 32x32x1).

The recipe follows DiT: adaLN-Zero init, AdamW without weight decay, hybrid MSE + VLB loss for
the learned variance, 10% label dropout for classifier-free guidance, EMA weights kept and
shipped. A GPU is expected (a few minutes on an H100); it runs on CPU only for smoke tests.

    python -m dtq.tools.train_tiny --out runtime/assets/dit-tiny-fmnist --minutes 7

The command, step count and final loss of the shipped weights are recorded in
``runtime/assets/dit-tiny-fmnist/README.md`` (written by this script as ``train_log.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from dtq.runtime.checkpoint import save_checkpoint
from dtq.runtime.diffusion import GaussianDiffusion
from dtq.runtime.model import DiT, DiTConfig
from dtq.tools.fmnist import load_fmnist, to_model_range

TINY_CONFIG = DiTConfig(input_size=32, patch_size=2, in_channels=1, hidden_size=128, depth=6, num_heads=4,
                        num_classes=10, learn_sigma=True, class_dropout_prob=0.1, space="pixel")


def train(out: Path, minutes: float, max_steps: int, batch: int, lr: float, ema_decay: float, seed: int,
          data_dir: str | None, device: str) -> dict:
    torch.manual_seed(seed)
    images, labels = load_fmnist("train", data_dir)
    data = torch.from_numpy(to_model_range(images)).to(device)
    targets = torch.from_numpy(labels).to(device)
    model = DiT(TINY_CONFIG).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    diffusion = GaussianDiffusion.dit()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = 500
    use_bf16 = device.startswith("cuda")
    start, step, history = time.time(), 0, []
    running, loss_sum = None, torch.zeros((), device=device)  # summed on device: no per-step sync
    while step < max_steps and time.time() - start < minutes * 60:
        idx = torch.randint(0, data.shape[0], (batch,), device=device)
        x0, y = data[idx], targets[idx]
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, t, noise)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            out_ = model(x_t, t, y)
        loss = diffusion.training_losses(out_.float(), x0, x_t, t, noise).mean()
        # linear warm-up, then cosine decay over the planned steps
        frac = min(1.0, (time.time() - start) / (minutes * 60), step / max_steps)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - ema_decay)
        step += 1
        loss_sum += loss.detach()
        if step % 100 == 0:
            mean = loss_sum.item() / 100
            loss_sum.zero_()
            running = mean if running is None else 0.9 * running + 0.1 * mean
        if step % 1000 == 0:
            history.append({"step": step, "loss_ema": round(running, 5), "seconds": round(time.time() - start, 1)})
            print(history[-1], flush=True)
    log = {"config": TINY_CONFIG.to_dict(), "steps": step, "batch": batch, "lr": lr, "ema": ema_decay, "seed": seed,
           "seconds": round(time.time() - start, 1), "final_loss_ema": running, "history": history,
           "device": torch.cuda.get_device_name() if use_bf16 else "cpu", "torch": torch.__version__}
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ema.float().cpu(), out / "model.safetensors", dtype=torch.float16,
                    extra_config={"steps": step, "data": "Fashion-MNIST train, 28x28 zero-padded to 32x32, [-1, 1]",
                                  "weights": "EMA, float16", "null_class": TINY_CONFIG.num_classes})
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory (model.safetensors + config.json)")
    p.add_argument("--minutes", type=float, default=7.0, help="wall-clock budget")
    p.add_argument("--max-steps", type=int, default=60000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    log = train(a.out, a.minutes, a.max_steps, a.batch, a.lr, a.ema, a.seed, a.data, a.device)
    print(json.dumps({k: v for k, v in log.items() if k != "history"}))


if __name__ == "__main__":
    main()
