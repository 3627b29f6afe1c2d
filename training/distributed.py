"""Process-group setup for DeepSpeed, whether launched by ``deepspeed``, ``torchrun`` or plain python.

Device and backend come from :mod:`training.accelerator` (DeepSpeed's accelerator), never from ``torch.cuda``.
"""
from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """A plain ``python launch/train.py`` is a world of one; give DeepSpeed the env it expects."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def _limit_cpu_threads(local_world_size: int) -> None:
    """Split the cores between the ranks of a node; oversubscription made the loop 4.5x slower."""
    if "OMP_NUM_THREADS" in os.environ:  # the user (or torchrun) chose
        return
    threads = max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(threads)


def shm_buffer_path(rank: int, addr: str | None = None, port: int | str | None = None) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce maps for ``rank`` (its shm.cpp names it so);
    address and port default to this process's rendezvous (MASTER_ADDR, MASTER_PORT)."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _release_shm_buffer(rank: int) -> None:
    """DeepSpeed never removes that file (69 MB per rank and run): left alone, every run's copy stays in
    RAM-backed /dev/shm until the machine runs out of memory. At exit every collective is done."""
    shm_buffer_path(rank).unlink(missing_ok=True)


def init_distributed() -> DistInfo:
    """Initialise the process group with the accelerator's backend and return this rank's place."""
    import deepspeed

    from training import accelerator

    _single_process_env()
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    deepspeed.init_distributed(dist_backend=accelerator.backend())
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not accelerator.on_gpu():
        atexit.register(_release_shm_buffer, rank)
        _limit_cpu_threads(local_world)
    accelerator.enable_tf32()
    return DistInfo(rank, world, local_rank, local_world, accelerator.device(local_rank))


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
