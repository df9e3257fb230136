"""Rotary position embeddings computed from *global* token positions (so sequence shards rotate correctly)."""

from __future__ import annotations

import torch
from torch import nn

from hylo.kernels.rope import apply_rope, inverse_frequencies, rope_cos_sin

__all__ = ["RotaryEmbedding", "apply_rope"]


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", inverse_frequencies(head_dim, theta).float(), persistent=False)

    def rebuild_buffers(self) -> None:
        """Recompute what the config defines and no checkpoint stores (a loader that built the module on the meta
        device, as transformers does, leaves it undefined)."""
        device = self.inv_freq.device if self.inv_freq.device.type != "meta" else torch.device("cpu")
        self.inv_freq = inverse_frequencies(self.head_dim, self.theta).float().to(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (seq,) integer tensor -> cos, sin of shape (seq, 1, head_dim // 2), float32."""
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        return cos[:, None, :], sin[:, None, :]
