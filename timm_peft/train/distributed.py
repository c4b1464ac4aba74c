"""Data-parallel runs under ``torchrun``: the process group (timm's ``init_distributed_device``)
and an evaluation sampler that counts every image once."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes in place (identity on one process)."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _setup_distributed(device: str | None) -> _Dist:
    """timm's ``init_distributed_device`` under torchrun (backend by device, env:// rendezvous);
    a process group someone else started (a test harness, a larger program) is joined, not
    re-initialised, and not destroyed at the end."""
    from timm.utils.distributed import init_distributed_device_so, is_distributed_env
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not is_distributed_env() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist(device=torch.device(device))
    if dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local_rank) if device.startswith("cuda") else torch.device(device)
        return _Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev)
    info = init_distributed_device_so(device=device.split(":")[0])
    return _Dist(rank=info["global_rank"], world_size=info["world_size"],
                 device=torch.device(info["device"]), owns_group=True)


class _ShardSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``, no padding: evaluation counts each image once.

    timm's ``OrderedDistributedSampler`` pads the last shard with repeated images so that every
    process gets as many; the repeats then count twice in the accuracy. Our evaluation sums
    correct predictions and counts over processes, so shards of unequal length are fine and the
    accuracy is exact (the papers' numbers differ by tenths of a point).
    """

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
