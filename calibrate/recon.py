"""Block reconstruction (BRECQ, Li et al. 2021) with AdaRound weights and LSQ activation steps.

An optional stage after any method (and after or instead of GPTQ): each DiT block in turn is
fitted so that its *quantized* output matches the FP block's output, MSE over all calibration
rows and timesteps pooled (the adaLN conditioning ``c`` comes along with each row).

- Inputs: the block's input recorded from the **quantized** model so far (blocks before it already
  reconstructed), targets: the FP block applied to the FP model's input. This is BRECQ's / QDrop's
  asymmetric reconstruction: the block also learns to undo the error the earlier quantized blocks
  left in its input, which is what sampling through the engine sees.
- Weights (AdaRound, Nagel et al. 2020): per quantized Linear with an integer weight format,
  ``W~ = s * clamp(floor(W / s) + h(V), qmin, qmax)`` with the rectified sigmoid
  ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` and the rounding regularizer
  ``sum 1 - |2 h(V) - 1|^beta``, off for the first ``warmup`` of the iterations, then ``beta``
  annealed 20 -> 2. ``W`` is the balanced weight ``W diag(b)`` (minus a low-rank branch ``L R``):
  the weight GPTQ works on; the per-group scales ``s`` stay as the method / GPTQ chose them. After
  GPTQ, the rounding starts at GPTQ's codes exactly: where GPTQ's error feedback put a code two or
  more steps from ``W / s``, that element's floor is shifted so the code is one of its two choices.
- Activations (``recon_act_steps``): the static per-tensor INT8 input step of each of the block's
  quantized Linears is learned with LSQ's straight-through gradient (Esser et al. 2020), as
  ``log s`` so one learning rate fits every layer's magnitude.

The result lands in the recipe exactly as GPTQ's does: ``LayerRecipe.weight`` holds the hard-rounded
weight, on the grid of ``weight_scale`` (so ``quant.quantize_weight`` returns AdaRound's codes in the
simulation, the ONNX initializers and the engine alike), and ``act_scale`` the learned step.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import quant
from ..runtime.qlinear import QuantLinear
from ..runtime.rotation import rotated_input
from ..runtime.recipe import Recipe, apply_recipe, balanced_model
from .config import CalibConfig
from .data import ForwardLoop

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches 0 and 1 exactly
BETA_START, BETA_END = 20.0, 2.0


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class AdaRoundLinear(nn.Module):
    """Training stand-in of one ``QuantLinear``: soft-rounded weight (AdaRound) and, optionally, a
    learned activation step (LSQ). ``hard()`` gives the weight and step to write back."""

    def __init__(self, q: QuantLinear, base: torch.Tensor, init_codes: torch.Tensor | None, learn_act: bool):
        super().__init__()
        self.q = q  # read-only here: bias, input_mul, low-rank branch, formats
        lo, hi = quant.INT_RANGE[q.weight_format]
        self.lo, self.hi = lo, hi
        s = quant.expand_weight_scale(q.weight_scale.float(), base.shape, q.weight_granularity, q.weight_group_size)
        self.register_buffer("s", s.expand_as(base).contiguous() if s.shape != base.shape else s)
        w_s = base.float() / self.s
        floor = torch.floor(w_s)
        if init_codes is None:  # AdaRound: h(V0) = the fractional part, the soft start at W itself
            h0 = w_s - floor
        else:
            # GPTQ's error feedback moves some codes (~3% at INT4) 2+ steps from W / s: shift those
            # elements' floor so the start is GPTQ's code exactly, free to move one step towards W.
            # (Projecting them onto floor / floor + 1 undid GPTQ's compensation: -0.9 dB held out.)
            codes = init_codes.float()
            floor = torch.minimum(torch.maximum(floor, codes - 1), codes)
            h0 = codes - floor  # exactly 0 or 1
        self.register_buffer("w_floor", floor)
        h0 = h0.clamp(0.01, 0.99)  # V finite
        self.V = nn.Parameter(-torch.log((ZETA - GAMMA) / (h0 - GAMMA) - 1))
        # a per-token (dynamic) input has no static step to learn
        self.learn_act = learn_act and q.act_format in quant.INT_RANGE and q.act_granularity == "tensor"
        if self.learn_act:
            self.log_act = nn.Parameter(torch.log(q.act_scale.detach().float().clone()))

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def round_loss(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def act_scale(self) -> torch.Tensor:
        return self.log_act.exp() if self.learn_act else self.q.act_scale

    def _quant_act(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.q.act_format
        if fmt == "none":
            return x
        if not self.learn_act:  # the simulation's activation quantizer, per tensor or per token
            return quant.fake_quant_act(x, self.q.act_scale, fmt, self.q.act_granularity)
        s = self.act_scale()
        lo, hi = quant.INT_RANGE[fmt]
        return _round_ste(x / s).clamp(lo, hi) * s  # LSQ: gradients to x (inside the range) and to s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        x = rotated_input(q, x)  # --rotate-fc2: QuantLinear.forward's order, rotation then Mul
        if q.input_mul is not None:
            x = x * q.input_mul
        xb = x
        w = self.s * (self.w_floor + self.h()).clamp(self.lo, self.hi)
        y = F.linear(self._quant_act(x), w, q.bias)
        if q.lowrank_up is not None:
            y = y + F.linear(F.linear(xb, q.lowrank_down), q.lowrank_up)
        return y

    @torch.no_grad()
    def hard(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hard-rounded weight (every code ``floor(W / s)`` or that + 1, saturated to the
        format) and the learned activation step (None if not learned)."""
        codes = (self.w_floor + (self.h() >= 0.5).float()).clamp(self.lo, self.hi)
        return codes * self.s, (self.act_scale().detach().reshape(()) if self.learn_act else None)


def _block_linears(block: nn.Module) -> dict[str, QuantLinear]:
    """The block's ``QuantLinear`` layers with an integer weight format (AdaRound's grid)."""
    return {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear) and m.weight_format in quant.INT_RANGE}


def _swap(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, attr, new)


@torch.no_grad()
def record_block_inputs(model: nn.Module, forward_loop: ForwardLoop, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [rows, tokens, hidden], c [rows, hidden])``: what the first block receives, all rows the
    loop feeds (a forward pre-hook on ``model.blocks[0]``; the embedders are not quantized)."""
    xs, cs = [], []

    def hook(mod, args):
        xs.append(args[0].detach().float().to(device))
        cs.append(args[1].detach().float().to(device))

    handle = model.blocks[0].register_forward_pre_hook(hook)
    try:
        forward_loop(model)
    finally:
        handle.remove()
    return torch.cat(xs), torch.cat(cs)


@torch.no_grad()
def _run_block(block: nn.Module, x: torch.Tensor, c: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([block(x[i:i + batch], c[i:i + batch]) for i in range(0, x.shape[0], batch)])


def _gptq_free_weights(model: nn.Module, recipe: Recipe, names: list[str]) -> dict[str, torch.Tensor]:
    """After GPTQ the recipe's ``weight`` is already rounded: AdaRound needs the weight GPTQ started
    from, ``W diag(b)`` (minus ``L R``), recomputed here. Without GPTQ the simulated layer's own
    weight is that weight (``W diag(b)`` or the low-rank residual): nothing to recompute."""
    if not recipe.options.get("gptq"):
        return {}
    folded = balanced_model(model, recipe, check=False)
    out = {}
    for name in names:
        w = folded.get_submodule(name).weight.detach().float()
        lowrank = recipe.lowrank(name)
        if lowrank is not None:
            up, down = lowrank
            w = w - up.to(w.device) @ down.to(w.device)
        out[name] = w
    return out


def _beta(it: int, iters: int, warmup: float) -> float | None:
    """None during warm-up (no regularizer), then 20 -> 2 linearly (BRECQ's LinearTempDecay)."""
    start = int(warmup * iters)
    if it < start:
        return None
    rel = (it - start) / max(iters - start, 1)
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - rel)


def reconstruct_blocks(model: nn.Module, recipe: Recipe, forward_loop: ForwardLoop, config: CalibConfig) -> Recipe:
    """``recipe`` (edited in place and returned) with each block's quantized Linears' weights
    AdaRound-rounded and, with ``config.recon_act_steps``, their activation steps learned."""
    if forward_loop is None:
        raise ValueError("block reconstruction needs calibration data (a CalibrationSet or forward_loop)")
    t0 = time.perf_counter()
    dev = torch.device(config.device)
    model = model.to(dev).eval()
    sim = apply_recipe(model, recipe, check=False).to(dev)
    x_fp, c = record_block_inputs(model, forward_loop, dev)
    x_q = x_fp.clone()  # the blocks before the first hold no quantized layer
    rows = x_fp.shape[0]
    all_names = {name for name, layer in recipe.layers.items() if layer.weight_format in quant.INT_RANGE}
    base = _gptq_free_weights(model, recipe, sorted(all_names))
    gen = torch.Generator().manual_seed(0)
    report = []
    blocks = range(len(model.blocks))
    if config.progress:
        from tqdm.auto import tqdm

        blocks = tqdm(blocks, desc="block reconstruction", leave=False)
    for k in blocks:
        fp_block, q_block = model.blocks[k], sim.blocks[k]
        target = _run_block(fp_block, x_fp, c, config.batch_size)
        linears = _block_linears(q_block)
        if not linears:
            x_fp, x_q = target, _run_block(q_block, x_q, c, config.batch_size)
            continue
        train = copy.deepcopy(q_block).requires_grad_(False)
        ada = {}
        for n, q in _block_linears(train).items():
            full = f"blocks.{k}.{n}"
            w = base.get(full)
            w = q.weight.detach().float() if w is None else w.to(dev)
            codes = None
            if full in base:  # GPTQ's codes start the rounding
                codes = torch.round(q.weight.detach().float() / quant.expand_weight_scale(
                    q.weight_scale, w.shape, q.weight_granularity, q.weight_group_size))
            ada[n] = AdaRoundLinear(q, w, codes, config.recon_act_steps)
            _swap(train, n, ada[n])
        before = _block_mse(train, x_q, c, target, config.batch_size, hard=ada)
        start = {n: [p.detach().clone() for p in a.parameters(recurse=False)] for n, a in ada.items()}
        v_params = [a.V for a in ada.values()]
        s_params = [a.log_act for a in ada.values() if a.learn_act]
        groups = [{"params": v_params, "lr": config.recon_lr}]
        if s_params:
            groups.append({"params": s_params, "lr": config.recon_act_lr})
        opt = torch.optim.Adam(groups)
        norm = float(target.pow(2).mean())  # the loss is relative: one reg weight fits every block
        n_weights = sum(a.V.numel() for a in ada.values())
        for it in range(config.recon_iters):
            idx = torch.randint(0, rows, (min(config.recon_batch, rows),), generator=gen).to(dev)
            with torch.enable_grad():
                out = train(x_q[idx], c[idx])
                rec = (out - target[idx]).pow(2).mean() / norm
                beta = _beta(it, config.recon_iters, config.recon_warmup)
                loss = rec
                if beta is not None:
                    loss = rec + config.recon_reg * sum(a.round_loss(beta) for a in ada.values()) / n_weights
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
        soft = float(sum(((a.h() > 0.01) & (a.h() < 0.99)).sum() for a in ada.values())) / n_weights
        after = _block_mse(train, x_q, c, target, config.batch_size, hard=ada)
        kept = after >= before  # the hard rounding lost to the start (too few iterations): keep the start
        if kept:
            with torch.no_grad():
                for n, a in ada.items():
                    for p, p0 in zip(a.parameters(recurse=False), start[n]):
                        p.copy_(p0)
        for n, a in ada.items():
            w_hard, act = a.hard()
            act = None if kept else act  # exp(log s) need not give s back bit for bit
            full = f"blocks.{k}.{n}"
            q = q_block.get_submodule(n)
            with torch.no_grad():
                q.weight.copy_(w_hard.to(q.weight.dtype))
            q.set_quant(weight_scale=q.weight_scale, act_scale=act if act is not None else q.act_scale,
                        input_mul=q.input_mul)
            recipe.tensors[f"{full}.weight"] = w_hard.detach().float().cpu()
            recipe.layers[full].weight = f"{full}.weight"
            if act is not None:
                recipe.layers[full].act_scale = float(act)
        report.append({"block": k, "rel_mse_before": round(before, 6), "rel_mse_after": round(min(after, before), 6),
                       "soft_fraction": round(soft, 4), "kept_start": kept})
        x_fp, x_q = target, _run_block(q_block, x_q, c, config.batch_size)
    recipe.options.update({"reconstruct": True, **{f: getattr(config, f) for f in RECON_FIELDS}})
    recipe.info.update({"recon_blocks": report, "recon_seconds": round(time.perf_counter() - t0, 2)})
    recipe.validate(model)
    return recipe


RECON_FIELDS = ("recon_iters", "recon_lr", "recon_act_lr", "recon_batch", "recon_act_steps", "recon_reg",
                "recon_warmup")


@torch.no_grad()
def _block_mse(train: nn.Module, x: torch.Tensor, c: torch.Tensor, target: torch.Tensor, batch: int,
               hard: dict[str, AdaRoundLinear]) -> float:
    """Relative MSE of the block with hard-rounded weights (what the recipe will hold)."""
    saved = {n: a.V.detach().clone() for n, a in hard.items()}
    for a in hard.values():  # h(V) in {0, 1} exactly: V far past the stretched sigmoid's ends
        a.V.copy_(torch.where(a.h() >= 0.5, torch.full_like(a.V, 50.0), torch.full_like(a.V, -50.0)))
    out = _run_block(train, x, c, batch)
    for n, a in hard.items():
        a.V.copy_(saved[n])
    return float((out - target).pow(2).mean() / target.pow(2).mean())
