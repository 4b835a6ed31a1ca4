"""A run's process group: this process's place in it, its share of the work, and the collectives
the recipe needs.

One process, or one per device under `torchrun` (gloo on CPU, nccl on CUDA; the group is made
under torchrun even for one process). Every collective carries tensors on the run's device, as
NCCL requires.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed run (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun: a process group even for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the run has a process group (and wraps the model in DDP)."""
        return self.launched or self.world_size > 1

    @classmethod
    def from_env(cls) -> DistInfo:
        """Read RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR as set by torchrun."""
        env = os.environ
        return cls(
            int(env.get("RANK", 0)),
            int(env.get("WORLD_SIZE", 1)),
            int(env.get("LOCAL_RANK", 0)),
            launched="MASTER_ADDR" in env and "RANK" in env,
        )


def shard(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous share [lo, hi) of n items that `rank` of `world_size` takes."""
    return n * rank // world_size, n * (rank + 1) // world_size


def init_distributed(device: torch.device, dist_info: DistInfo) -> None:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) when there are several."""
    if not dist_info.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def any_rank(values: list[float], dist_info: DistInfo, device: torch.device) -> list[float]:
    """The largest of each value over all ranks (each rank's own values outside a process
    group): what one rank saw, every rank acts on at the same step."""
    if not dist_info.distributed:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather_scores(
    scores: np.ndarray, offsets: np.ndarray, dist_info: DistInfo, device: torch.device
) -> np.ndarray:
    """Every rank's share (`shard`) of the scores of impressions 0 .. len(offsets) - 2, in order
    (on all ranks). Shares differ in length: each is padded to the longest, on `device`."""
    world, n = dist_info.world_size, len(offsets) - 1
    sizes = []
    for rank in range(world):
        lo, hi = shard(n, rank, world)
        sizes.append(int(offsets[hi] - offsets[lo]))
    padded = torch.zeros(max(sizes), device=device)
    padded[: len(scores)] = torch.from_numpy(scores).to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:size] for p, size in zip(parts, sizes, strict=True)]).cpu().numpy()
