"""Data-parallel sampling (and calibration) under ``torchrun``: each rank runs a share of a job's
batches and rank 0 gathers them in order.

A job is a list of batches, each fully determined by its start index (its slice of the job's
noise and labels, and its per-step generator seeded from the start). Batch ``i`` runs on rank
``i % world_size``, so a run on N ranks computes the same batches as a single process and the
gathered result is the same, byte for byte on the same hardware. Gathering is one
``gather_object`` per round of ``world_size`` batches, which keeps rank 0's transfer buffer to
one round and leaves the results in batch order without sorting.

Launch: ``torchrun --nproc-per-node N -m dtq.tools.sample ...``. torchrun's environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) is read; without it (or with ``WORLD_SIZE=1``) nothing
here touches ``torch.distributed``. On CUDA each rank takes ``cuda:LOCAL_RANK`` and the group is
``cpu:gloo,cuda:nccl``: the gathered batches are CPU tensors, which object collectives then send
through gloo, while NCCL is there for any CUDA collective. Calibration (``dtq.calibrate``) deals
its batches the same way and reduces statistics with ``all_gather_objects``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


SINGLE = DistContext()


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """torchrun's ``RANK`` (0 without torchrun): for code that runs after the group is gone."""
    return int(os.environ.get("RANK", "0"))


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """The device of this rank: ``cuda`` (any or no index given as plain ``cuda``) becomes
    ``cuda:LOCAL_RANK``; an explicit other index under several ranks would put every rank on one
    GPU, so it is refused."""
    if not ctx.active or device.type != "cuda":
        return device
    if device.index is not None and device.index != ctx.local_rank:
        raise ValueError(f"--device {device} under torchrun: give --device cuda (or auto); "
                         "each rank uses cuda:LOCAL_RANK")
    if ctx.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {ctx.local_rank} but only {torch.cuda.device_count()} CUDA devices")
    torch.cuda.set_device(ctx.local_rank)
    return torch.device("cuda", ctx.local_rank)


@contextlib.contextmanager
def data_parallel(device: torch.device) -> Iterator[DistContext]:
    """The rank context of this process. Under torchrun it joins (or reuses) the default process
    group, and destroys the group on exit only if it created it."""
    if env_world_size() <= 1 and not dist.is_initialized():
        yield SINGLE
        return
    created = False
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        created = True
    try:
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        yield ctx
        if created:
            # the ranks leave together (not after an error: a failed rank never arrives): a rank that
            # destroyed its gloo group while rank 0 was still writing the files was once aborted by gloo
            # ("terminate called without an active exception", SIGABRT) in the two-rank sampling test
            dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


Batch = torch.Tensor | tuple[torch.Tensor, ...]


def map_batches(total: int, batch_size: int, fn: Callable[[int, slice], Batch],
                ctx: DistContext = SINGLE, progress: bool = False) -> Batch | None:
    """``torch.cat([fn(start, slice(start, start + batch_size)) for each batch])``, with batch ``i``
    computed on rank ``i % world_size``. Returns the concatenation on rank 0 and None elsewhere.
    ``fn`` must return CPU tensors (or a tuple of them, concatenated element-wise) and depend only
    on its batch (not on what ran before)."""
    starts = list(range(0, total, batch_size))
    rounds = range(0, len(starts), ctx.world_size)
    if progress and ctx.is_main and len(starts) > 1:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc="batches" if not ctx.active else f"batches x{ctx.world_size} ranks", unit="round")
    outputs: list[Batch] = []
    for first in rounds:
        i = first + ctx.rank
        mine = _cpu(fn(starts[i], slice(starts[i], starts[i] + batch_size))) if i < len(starts) else None
        if not ctx.active:
            outputs.append(mine)
            continue
        gathered = [None] * ctx.world_size if ctx.is_main else None
        dist.gather_object(mine, gathered, dst=0)
        if ctx.is_main:
            outputs.extend(t for t in gathered if t is not None)  # rank order = batch order
    if not ctx.is_main:
        return None
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)


def _cpu(batch: Batch) -> Batch:
    return tuple(t.cpu() for t in batch) if isinstance(batch, tuple) else batch.cpu()


def all_gather_objects(obj: Any, ctx: DistContext = SINGLE) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process). Objects
    travel pickled through the CPU group: give CPU tensors."""
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext = SINGLE) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
    if not ctx.active:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
