"""Process-group set-up from the environment torchrun (single or multi-node) or DeepSpeed's launcher provides."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """Join the process group when launched with WORLD_SIZE > 1; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
        store, rank, world = next(dist.rendezvous("env://"))
        # A run restarted by `torchrun --max-restarts` meets in the same store: without a per-attempt prefix the
        # new workers read the dead attempt's addresses and hang connecting to them.
        store = dist.PrefixStore(f"hylo/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world,
                                device_id=dev if backend == "nccl" else None)
    return DistInfo(rank, world, local_rank, dev)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# What gloo, NCCL and the rendezvous store say when the other end of a connection is gone.
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
              "NCCL communicator was aborted", "Socket Timeout", "connection to the store")


def peer_lost(err: BaseException):
    """A HyloError saying this rank lost its peers (a rank or the launcher died), for an error a collective or the
    rendezvous store raised because the other end is gone; None for any other error."""
    from hylo.trainer.errors import PeerLost
    from hylo.trainer.runtime.launcher_watch import launcher_died

    text = str(err)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not isinstance(err, (RuntimeError, ConnectionError)):
        return None  # (torch.distributed's DistError is a RuntimeError)
    if not (isinstance(err, dist.DistError) or any(mark in text for mark in _PEER_GONE)):
        return None
    rank = os.environ.get("RANK", "?")
    cause = next((mark for mark in _PEER_GONE if mark in text), type(err).__name__)
    who = "its torchrun agent died" if launcher_died() else "another rank died or was killed"
    return PeerLost(f"rank {rank} lost contact with the job ({cause}): {who}. The last complete checkpoint is "
                    "kept; run with torchrun --max-restarts=N to restart the ranks automatically, or launch again "
                    "(checkpoint.resume=auto)")


def local_ranks() -> int:
    """The ranks on this node: torchrun's LOCAL_WORLD_SIZE, DeepSpeed's launcher's LOCAL_SIZE, else 1."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1")


def _own_running() -> int:
    """This process's threads that are running now (torch's intra-op threads spin a while after each op)."""
    running = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            running += stat.read_text().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue
    return running


def others_running(samples: int = 3, gap: float = 0.03) -> int:
    """Tasks other than this process's running or ready to run on this machine now (/proc/loadavg's fourth
    field), the least of a few quick samples: what other work takes from the cores at this moment, not the
    lagging 1-minute load average (a run started right after a `pip install` would keep one core of two)."""
    counts = []
    for i in range(samples):
        counts.append(max(0, _runnable() - max(_own_running(), 1)))
        if i + 1 < samples:
            time.sleep(gap)
    return min(counts)


def _runnable() -> int:
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return int(os.getloadavg()[0] + 0.5)  # no /proc: the 1-minute average


def cpu_threads(requested: int = 0, peer_threads: int = 1) -> tuple[int, str]:
    """(intra-op threads for this CPU rank, why).  torch's default (every core, per process) collapses when other
    work shares the cores: busy-waiting threads fight over them (10 steps of the tiny config: 29 s at the
    default on a loaded 2-core box, 6.5 s on one thread).  Auto: the cores this process may use, shared by the
    node's ranks, less what other work runs on them now, at least 1 (callbacks/cpu_threads.py revisits it while
    training; `peer_threads`: the threads each other rank of the node runs, 1 while starting)."""
    if requested:
        return requested, "train.cpu_threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks = local_ranks()
    others = max(0, others_running() - (ranks - 1) * peer_threads)  # the node's other ranks are not "other work"
    threads = max(1, min(cores // ranks, (cores - others) // ranks))
    return threads, f"{cores} cores for {ranks} rank(s), {others} other task(s) running"
