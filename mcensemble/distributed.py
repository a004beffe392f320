"""More than one process: thin helpers over `torch.distributed`, no-ops in a single process.

`torchrun --nproc_per_node N -m mcensemble build ...` starts N processes with the
`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` environment variables
set; `init_from_env` joins them into one process group (gloo on CPU, nccl on CUDA).
Without those variables (or with `WORLD_SIZE=1`) nothing is initialised and every helper
here behaves as if there were one process: `rank() == 0`, `world_size() == 1`,
`shard(seq)` is the whole sequence, `all_reduce_mean_` does nothing, `gather_objects(x)` is
`[x]`. So library code calls them unconditionally.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator, Sequence, TypeVar

import torch

__all__ = ["init_from_env", "rank", "world_size", "local_rank", "is_main", "is_distributed", "barrier",
           "all_reduce_sum_", "all_reduce_mean_", "shard", "shard_indices", "gather_objects",
           "gather_sharded", "broadcast_object", "session", "process_device", "env_world_size"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def env_world_size() -> int:
    """`WORLD_SIZE` from the environment (1 when unset or not a number)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 in a single process)."""
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """`LOCAL_RANK` (the process's index on its machine; torchrun sets it), else 0."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    """True on rank 0 (the process that writes files and prints)."""
    return rank() == 0


def process_device(device: str | torch.device) -> torch.device:
    """The device this process uses: `cuda` (no index) becomes `cuda:LOCAL_RANK` when
    several processes run; an explicit index or another device is kept."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join the process group torchrun describes in the environment (`WORLD_SIZE` > 1).

    Backend nccl when `device` is CUDA (after `torch.cuda.set_device`), else gloo.
    Returns True when this call initialised the group; False when there is a single
    process or the group already exists."""
    import torch.distributed as dist
    if env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    device = process_device(device)
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, **kwargs)
    log.debug("process group: rank %d of %d, backend %s", rank(), world_size(), backend)
    return True


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        import torch.distributed as dist
        dist.barrier()


def _flat_reduce(tensors: Sequence[torch.Tensor], scale: float | None) -> None:
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    if not tensors:
        return
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:  # one collective per dtype / device
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for group in by_kind.values():
        flat = _flatten_dense_tensors(group)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if scale is not None:
            flat.mul_(scale)
        for t, r in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(r)


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """In place: every tensor becomes its sum over the processes (no-op in one process)."""
    if is_distributed():
        _flat_reduce(list(tensors), None)


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """In place: every tensor becomes its mean over the processes (no-op in one process).
    Every process ends with the same values, bit for bit."""
    if is_distributed():
        _flat_reduce(list(tensors), 1.0 / world_size())


def shard_indices(n: int) -> list[int]:
    """The indices of `range(n)` this process handles: rank, rank + world, ..."""
    return list(range(rank(), n, world_size()))


def shard(seq: Sequence[T]) -> list[T]:
    """This process's share of `seq` (every world-th item from its rank); all of it in one process."""
    return [seq[i] for i in shard_indices(len(seq))]


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in rank order, on every process; `[obj]` in one process."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_sharded(items: Sequence[T], n: int) -> list[T]:
    """Undo `shard`: `items` are this process's results for `shard_indices(n)`; returns
    all `n` results in the original order, on every process."""
    if not is_distributed():
        return list(items)
    parts = gather_objects(list(items))
    out: list[Any] = [None] * n
    for r, part in enumerate(parts):
        for i, item in zip(range(r, n, len(parts)), part):
            out[i] = item
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every process (`obj` itself in one process)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def session(device: str | torch.device = "cpu", *, quiet_others: bool = True) -> Iterator[str]:
    """Join torchrun's process group for the duration (a no-op without `WORLD_SIZE` > 1) and
    tear it down on exit, also on errors. Yields the device this process uses (as a string:
    `cuda` becomes `cuda:LOCAL_RANK`). With `quiet_others`, ranks other than 0 write nothing
    to stdout and log only errors while inside."""
    import torch.distributed as dist
    created = init_from_env(device)
    dev = str(process_device(device)) if env_world_size() > 1 else str(device)
    saved_out, saved_level, devnull = sys.stdout, None, None
    mlog = logging.getLogger("mcensemble")
    if quiet_others and is_distributed() and not is_main():
        devnull = open(os.devnull, "w")
        sys.stdout = devnull
        saved_level = mlog.level
        mlog.setLevel(logging.ERROR)
    try:
        yield dev
    finally:
        if devnull is not None:
            sys.stdout = saved_out
            devnull.close()
            mlog.setLevel(saved_level)
        if created and dist.is_initialized():
            dist.destroy_process_group()
