"""The run's parallel layout in one object: world = dp x cp ranks on one device mesh, built whenever there is
more than one rank.  Everything that needs a data-parallel rank or a CP group reads it here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelDims:
    world: int
    cp: int
    rank: int
    mesh: DeviceMesh | None  # ("dp", "cp"); None with a single process (nothing to group)

    @classmethod
    def build(cls, world: int, rank: int, cp: int, device: torch.device) -> ParallelDims:
        """Ranks r*cp .. r*cp+cp-1 share sequences (one CP group); the world/cp groups of them are data parallel."""
        if cp < 1 or world % cp:
            raise ValueError(f"parallel.cp={cp} must divide the number of ranks ({world})")
        mesh = init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp")) if world > 1 else None
        return cls(world=world, cp=cp, rank=rank, mesh=mesh)

    @property
    def dp(self) -> int:
        return self.world // self.cp

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp") if self.mesh is not None else 0

    @property
    def cp_rank(self) -> int:
        return self.mesh.get_local_rank("cp") if self.mesh is not None else 0

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        return self.mesh.get_group("cp") if self.mesh is not None and self.cp > 1 else None

    def cp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over this rank's CP group (itself without CP); every CP rank must call it."""
        group = self.cp_group
        if group is None:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor
