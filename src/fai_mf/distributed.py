"""Small torch.distributed helpers; every function is a no-op in a single process.

Processes are started by torchrun (or anything that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
`init_from_env` joins the group with NCCL on CUDA and gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device_type: str, timeout: datetime.timedelta | None = None) -> bool:
    """Join the process group described by the environment; False (and nothing done) when WORLD_SIZE <= 1.

    timeout: how long a collective waits for the slowest process (torch's default when None)."""
    if is_distributed():
        return True
    if env_world_size() <= 1:
        return False
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return True


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all processes (a copy; the input is left unchanged)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(tensor) / world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of process `src`, on every process (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """The `obj` of every process, in rank order, on process `dst` (None elsewhere)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] | None = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
