"""Recurrent decoding for the short causal convolution: the state is the last K-1 inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def short_conv_step(state: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: x (B, C) -> (y (B, C), state (B, K-1, C): the last K-1 inputs)."""
    k = weight.shape[1]
    if state is None:
        state = x.new_zeros(x.shape[0], k - 1, x.shape[1])
    window = torch.cat([state, x[:, None]], dim=1)  # (B, K, C)
    y = (window * weight.t()).sum(1)
    return (y + bias if bias is not None else y), window[:, 1:]


def short_conv_prefill(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The state `short_conv_step` holds after a prompt x (B, T, C): its last K-1 inputs, zeros before its start."""
    if kernel_size == 1:
        return x[:, :0]
    return F.pad(x, (0, 0, kernel_size - 1, 0))[:, -(kernel_size - 1):]
