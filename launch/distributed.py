"""Process-group set-up from the environment torchrun (single or multi-node) or DeepSpeed's launcher provides."""

from __future__ import annotations

import os
from dataclasses import dataclass

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
