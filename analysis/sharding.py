"""Work split under torchrun: whole batches dealt to ranks, contiguous blocks of samples, gather on rank 0.

Without torchrun (``WORLD_SIZE`` unset or 1) everything here is the identity: one rank holds all work.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed() -> Iterator[Dist]:
    """The process group of a torchrun launch (NCCL on CUDA, else gloo), or a single rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Dist()
        return
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        yield Dist(dist.get_rank(), dist.get_world_size())
    finally:
        dist.barrier()
        dist.destroy_process_group()


def shard_batches(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Indices of the examples rank ``rank`` runs: whole batches dealt round-robin (partial last), so a
    batch-dependent gate sees the same batches as in one process."""
    starts = range(0, n, batch_size)
    return [i for b, s in enumerate(starts) if b % world == rank for i in range(s, min(s + batch_size, n))]


def contiguous_share(items: Sequence, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous block of ``items``: concatenating the blocks in rank order gives ``items``."""
    n = len(items)
    return list(items[rank * n // world : (rank + 1) * n // world])


def gather_to_main(obj, d: Dist) -> list | None:
    """Every rank's ``obj`` on rank 0 (in rank order); None on the other ranks."""
    if d.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world if d.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out
