"""Process-group setup for DeepSpeed, whether launched by ``deepspeed``, ``torchrun`` or plain python.

Device and backend come from :mod:`training.accelerator` (DeepSpeed's accelerator), never from ``torch.cuda``.

A single-node run (MASTER_ADDR 127.0.0.1 or localhost, as the deepspeed launcher sets it without a hostfile)
listens on loopback only: see :func:`_loopback_process_group`. The launcher's default port is 29500 for every
job; two jobs on one machine need ``deepspeed --master_port <free port>`` (the ranks cannot pick one
themselves: they must all agree on it before they can talk).
"""
from __future__ import annotations

import atexit
import ipaddress
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


def _loopback_master() -> bool:
    """Whether MASTER_ADDR is literally a loopback address: then every rank runs on this machine.

    A host name is not resolved: Debian maps a machine's own name to 127.0.1.1, yet as the MASTER_ADDR of
    a multi-node job that name is where the other nodes reach rank 0. Under torchrun the store belongs to
    its agent (TORCHELASTIC_USE_AGENT_STORE), not to rank 0, and is left as it is."""
    addr = os.environ.get("MASTER_ADDR", "")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return False
    try:
        return addr == "localhost" or ipaddress.ip_address(addr.strip("[]")).is_loopback
    except ValueError:
        return False


def _loopback_process_group(backend: str, device_type: str) -> None:
    """The process group of a single-node run, with nothing listening beyond 127.0.0.1.

    torch's ``env://`` rendezvous makes rank 0's TCPStore listen on every interface (``*:MASTER_PORT``)
    whatever MASTER_ADDR says, so rank 0 binds the socket itself and hands it over (``master_listen_fd``);
    gloo's and NCCL's own sockets follow the interface named by ``GLOO_SOCKET_IFNAME`` and
    ``NCCL_SOCKET_IFNAME`` (else the host name's address, or the first non-loopback interface), set to
    ``lo`` here unless the user chose one. DeepSpeed then wraps this group as a user-made one."""
    from deepspeed.constants import default_pg_timeout  # DEEPSPEED_TIMEOUT, as deepspeed.init_distributed

    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    listen_fd = None
    if rank == 0:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            sock.close()
            raise RuntimeError(f"rendezvous port {host}:{port} is taken ({err.strerror}): another job uses it; "
                               "start this one with deepspeed --master_port <a free port>") from err
        sock.listen()
        listen_fd = sock.detach()
    store = torch.distributed.TCPStore(host, port, world, rank == 0, default_pg_timeout, master_listen_fd=listen_fd)
    # as DeepSpeed's TorchBackend does: bind the GPU on a multi-rank CUDA run
    cuda = device_type == "cuda" and world > 1
    device = {"device_id": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))} if cuda else {}
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world,
                                         timeout=default_pg_timeout, **device)


def init_distributed() -> DistInfo:
    """Initialise the process group with the accelerator's backend and return this rank's place."""
    import deepspeed

    from training import accelerator

    _single_process_env()
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    if _loopback_master():
        _loopback_process_group(accelerator.backend(), accelerator.device_type())
    deepspeed.init_distributed(dist_backend=accelerator.backend())  # wraps a process group made above
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


def rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (one broadcast; a world of one needs none)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.broadcast(value, src=0)
    return bool(value.item())
