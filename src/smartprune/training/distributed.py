"""Data parallelism over torch.distributed: which process this is, the batch split, gradient averaging."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from smartprune.errors import DataError


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_batch_split(batch_size: int, processes: int) -> None:
    """The global batch must split evenly over the processes (each takes an equal slice)."""
    if batch_size % processes:
        raise DataError(f"batch_size {batch_size} does not split evenly over {processes} processes")


def all_reduce_mean(tensors: list[Tensor], size: int) -> None:
    """Average `tensors` over processes with one all-reduce of their concatenation."""
    if size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def agreed(flag: bool, sharded: bool, device: torch.device) -> bool:
    """Rank 0's decision on every process (clocks differ, and a sharded save needs all of them)."""
    if not sharded:
        return flag
    t = torch.tensor([int(flag)], device=device)  # NCCL sends only GPU tensors
    dist.broadcast(t, 0)
    return bool(t.item())




def any_rank(value: int, size: int, device: torch.device) -> int:
    """The largest of `value` over all processes (0 on all of them when none is set): a stop that any
    process received is taken by every process at the same step."""
    if size == 1:
        return value
    t = torch.tensor([value], device=device)  # NCCL sends only GPU tensors
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
