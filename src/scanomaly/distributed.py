"""Data-parallel training on several processes (torchrun), one or many machines.

    torchrun --nproc_per_node=4 -m scanomaly train healthygan ...            # one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29500 -m scanomaly train healthygan ...  # two machines

torchrun starts one process per device and sets RANK / WORLD_SIZE / LOCAL_RANK; `init_from_env`
joins them into a process group (NCCL on GPUs, gloo on CPUs). Without torchrun nothing here does
anything: the world is one process.

The rule that makes N processes train like one: **every rank holds the same random state and
draws the same random numbers, for the whole global batch, then keeps its own slice.** The data
order and flips (`training.loop.BatchStream`), the latent codes, noise and the gradient penalty's
interpolation weights (`per_sample_rand` / `per_sample_randn`) are all drawn that way. So a run on
2 processes with a global batch of 16 sees exactly the samples and random numbers that a 1-process
run with batch 16 sees, and (for networks without BatchNorm, whose statistics are per process)
ends with the same weights up to float rounding. It also keeps the checkpoints simple: rank 0's
RNG state is every rank's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ScanomalyError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, n_global: int) -> slice:
        """This rank's contiguous part of a global batch of n_global samples."""
        if n_global % self.size:
            raise ScanomalyError(f"the batch size ({n_global}) must be a multiple of the number of processes ({self.size})")
        n = n_global // self.size
        return slice(self.rank * n, (self.rank + 1) * n)


def world() -> World:
    """The current process group (one process when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: str = "cpu") -> World:
    """Join the process group torchrun describes (a no-op without torchrun).

    NCCL when training on CUDA, gloo on CPU. Each process uses GPU LOCAL_RANK.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise ScanomalyError("this PyTorch build has no torch.distributed; run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    on_cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
    if on_cuda:
        if not torch.cuda.is_available():
            raise ScanomalyError("--device cuda under torchrun, but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    return world()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world().distributed:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """rank `src`'s object, on every rank."""
    if not world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (the tensor itself on one process)."""
    w = world()
    if not w.distributed:
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / w.size


def per_sample_rand(n: int, *shape: int, device=None, dtype=None) -> torch.Tensor:
    """torch.rand(n, *shape) for this rank's n samples: drawn for the global batch, sliced (see the
    module docstring), so that N processes draw what one process would."""
    w = world()
    out = torch.rand(n * w.size, *shape, device=device, dtype=dtype)
    return out[w.rank * n : (w.rank + 1) * n]


def per_sample_randn(n: int, *shape: int, device=None, dtype=None) -> torch.Tensor:
    """torch.randn(n, *shape), drawn like `per_sample_rand`."""
    w = world()
    out = torch.randn(n * w.size, *shape, device=device, dtype=dtype)
    return out[w.rank * n : (w.rank + 1) * n]
