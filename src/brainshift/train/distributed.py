"""Single-process or ``torchrun`` DistributedDataParallel setup, seeding and rank-0-only helpers.

``brainshift train`` runs unchanged under ``torchrun --nproc_per_node N``: torchrun's launch protocol sets
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each process's environment
(the only environment variables read, and only to join the process group torchrun created). The process
group uses NCCL on GPUs (one GPU per process, ``cuda:LOCAL_RANK``) and gloo on CPU. Only rank 0 writes files.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch


@dataclass
class DistContext:
    """Where this process stands.

    Attributes:
        rank: global rank (0 when not distributed).
        world_size: number of processes (1 when not distributed).
        local_rank: rank on this machine (selects the GPU).
        device: this process's torch device.
        backend: ``"nccl"``, ``"gloo"`` or None (single process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when running with more than one process."""
        return self.world_size > 1


def setup_distributed(device: str = "cpu") -> DistContext:
    """Resolve the device and, under torchrun (``WORLD_SIZE > 1``), join the process group.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (``"cuda"`` without a GPU raises).

    Returns:
        :class:`DistContext`.

    Raises:
        BrainshiftError: CUDA requested but not available, or fewer GPUs than local processes.
    """
    import torch.distributed as dist

    from brainshift.device import resolve_device
    from brainshift.errors import BrainshiftError

    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=dev)
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise BrainshiftError(f"expected one GPU per process, got local rank {local} with "
                                  f"{torch.cuda.device_count()} GPU(s)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        # long timeout: ranks > 0 wait at a barrier while rank 0 validates and writes checkpoints
        dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank,
                                timeout=timedelta(hours=2))
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def cleanup_distributed(ctx: DistContext) -> None:
    """Leave the process group (no-op for a single process)."""
    import torch.distributed as dist

    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every process (no-op for a single process)."""
    import torch.distributed as dist

    if ctx.distributed and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's ``obj`` on every process (identity for a single process)."""
    import torch.distributed as dist

    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (libraries that draw from the global generator)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker seeding: python/numpy global generators from torch's per-worker seed.

    (Samples themselves are drawn from explicit generators seeded by ``(seed, epoch, index)``; this only
    keeps any library using the global generators reproducible.)
    """
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)  # noqa: NPY002 (libraries that draw from the global generator)
