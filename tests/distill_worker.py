"""Run under torchrun (2 ranks, gloo): both distillation objectives laid out across ranks against one rank.

  torchrun --nproc_per_node=2 -m tests.distill_worker SEED

Every rank builds the same float64 teacher (dense) and student (one layer of every other type, started from the
teacher) and computes the one-rank reference on the whole batch.  Then, per case — cp=2 ring, cp=2 Ulysses (the
teacher's attention on the same layout as the student's layers), FSDP2 over 2 data-parallel ranks (student and
teacher sharded, each rank half the batch) — the objective's loss averaged over ranks, and the student's gradient
(averaged over ranks, as data parallelism does), must equal the reference (relative error <= 1e-10 for losses,
1e-9 for gradients).  Prints `CASE <objective>-<layout> ok <loss error> <grad error>`; any mismatch raises.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from hylo.trainer.data.loader import inputs_and_targets
from hylo.trainer.engines.base import MicroBatch
from tests.test_distill import build_pair, make_objective

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grads(model) -> torch.Tensor:
    parts = []
    for p in model.parameters():
        if p.requires_grad:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            parts.append((g.full_tensor() if hasattr(g, "full_tensor") else g).reshape(-1))
    return torch.cat(parts)


def main(seed: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from hylo.parallel.dims import ParallelDims
    from hylo.parallel.strategies import apply_context_parallel, make_context
    from hylo.trainer.distillation.teacher import prepare_teacher

    torch.manual_seed(seed)
    seq_len = 32
    batch = torch.randint(0, 96, (2, seq_len + 1))
    for objective in ("align", "distill"):
        teacher, student = build_pair(seed)
        ref_obj = make_objective(objective, teacher, student)
        inputs, targets = inputs_and_targets(batch)
        ref_loss = ref_obj(student, MicroBatch(inputs, targets, None, None))
        ref_loss.backward()
        ref_grad = grads(student)

        for layout in ("ring", "ulysses", "fsdp2"):
            teacher_r, student_r = build_pair(seed)
            if layout == "fsdp2":
                from torch.distributed.fsdp import fully_shard

                dims = ParallelDims.build(world, rank, 1, torch.device("cpu"))
                for block in student_r.blocks:
                    fully_shard(block)
                fully_shard(student_r)
                prepare_teacher(teacher_r, torch.device("cpu"), F64, shard=True)
                rows = batch[rank::world]
                micro = MicroBatch(*inputs_and_targets(rows), None, None)
            else:
                dims = ParallelDims.build(world, rank, world, torch.device("cpu"))
                ctx = make_context(dims.mesh, seq_len, layout, 1)
                apply_context_parallel(student_r, ctx)
                prepare_teacher(teacher_r, torch.device("cpu"), F64, cp_context=ctx)
                positions = ctx.positions(torch.device("cpu"))
                micro = MicroBatch(*inputs_and_targets(batch, positions), positions, None)
            obj = make_objective(objective, teacher_r, student_r)
            loss = obj(student_r, micro)
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            total /= world
            grad = grads(student_r)
            if layout != "fsdp2":  # each rank's gradient is its own tokens' share: summed as data parallelism does
                dist.all_reduce(grad)
            grad /= world if layout != "fsdp2" else 1
            loss_err, grad_err = rel(total, ref_loss.detach()), rel(grad, ref_grad)
            if rank == 0:
                print(f"CASE {objective}-{layout} ok {loss_err:.2e} {grad_err:.2e}", flush=True)
            assert loss_err <= 1e-10 and grad_err <= 1e-9, (objective, layout, loss_err, grad_err)
            del dims
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]))
