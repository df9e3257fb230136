"""The two objectives that learn from a teacher, each a callable the engines run per micro-batch in place of the
next-token loss (`objective(model, micro) -> loss`), keeping its own terms for logging (`scalars()`).

align    For each aligned block i (teacher.align_layers), the teacher's residual stream entering block i (its own
         hidden states: teacher forcing) goes through the student's block i mixer alone, which learns to output
         what the teacher's attention output there: loss_i = mean squared error over tokens and features.  Every
         block trains at once and independently; only their mixers' parameters train (the trainer freezes the
         rest).  The step's loss is the mean over the blocks; each is logged as distill/align/<i>.
distill  End to end: the KL from the teacher's next-token distribution to the student's, both at temperature T
         and scaled by T^2 (Hinton et al.: gradients keep their size across temperatures), plus lm_weight times
         the student's cross-entropy.  Computed `train.loss_chunk` tokens at a time through both heads
         (models/loss.py `distillation_loss`): neither model's full logits ever exist.  Logged as distill/kl (at
         T, unscaled) and distill/lm (the student's cross-entropy, whatever its weight).

The teacher runs frozen under no_grad in the same micro-batch layout (context-parallel positions, packed
documents) as the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hylo.models.loss import distillation_loss
from hylo.trainer.distillation.teacher import Teacher
from hylo.trainer.engines.base import MicroBatch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 activations), float64 kept (the oracle tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class TeacherObjective:
    def __init__(self, teacher: Teacher):
        self.teacher = teacher
        self.sums: dict[str, torch.Tensor] = {}
        self.calls = 0

    def _keep(self, terms: dict[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            value = upcast(value.detach())
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.calls += 1

    def scalars(self) -> dict[str, torch.Tensor]:
        """Each term's mean over the micro-batches since the last call (0-d tensors on the device), then reset."""
        out = {name: total / max(self.calls, 1) for name, total in self.sums.items()}
        self.sums, self.calls = {}, 0
        return out


class AlignObjective(TeacherObjective):
    def __init__(self, teacher: Teacher, layers: list[int]):
        super().__init__(teacher)
        self.layers = layers
        self.captured: dict[int, list[torch.Tensor]] = {}
        for i in layers:  # the residual stream entering block i, and what its attention outputs
            block = teacher.model.blocks[i]
            block.register_forward_pre_hook(lambda module, args, i=i: self.captured.setdefault(i, []).append(args[0]))
            block.mixer.register_forward_hook(lambda module, args, out, i=i: self.captured[i].append(out))

    def __call__(self, model: nn.Module, micro: MicroBatch) -> torch.Tensor:
        self.captured.clear()
        self.teacher.forward(micro, head_loss=lambda hidden, weight: None)
        streams = {i: self.captured[i][0] for i in self.layers}
        targets = {i: self.captured[i][1] for i in self.layers}
        self.captured.clear()
        outputs = model(micro.inputs, micro.positions, cu_seqlens=micro.cu_seqlens, mixer_inputs=streams)
        losses = {i: F.mse_loss(upcast(outputs[i]), upcast(targets[i])) for i in self.layers}
        self._keep({f"distill/align/{i}": loss for i, loss in losses.items()})
        return torch.stack(list(losses.values())).mean()


class DistillObjective(TeacherObjective):
    def __init__(self, teacher: Teacher, temperature: float, lm_weight: float, loss_chunk: int):
        super().__init__(teacher)
        self.temperature, self.lm_weight, self.loss_chunk = temperature, lm_weight, loss_chunk

    def __call__(self, model: nn.Module, micro: MicroBatch) -> torch.Tensor:
        teacher_hidden = self.teacher.forward(micro, head_loss=lambda hidden, weight: hidden)
        teacher_weight = self.teacher.head_weight()
        chunk = self.loss_chunk if self.loss_chunk > 0 else micro.targets.numel()

        def against_teacher(hidden: torch.Tensor, weight: torch.Tensor):
            return distillation_loss(hidden, weight, teacher_hidden, teacher_weight, micro.targets,
                                     self.temperature, chunk)

        kl, ce = model(micro.inputs, micro.positions, cu_seqlens=micro.cu_seqlens, head_loss=against_teacher)
        self._keep({"distill/kl": kl, "distill/lm": ce})
        return self.temperature ** 2 * kl + self.lm_weight * ce
