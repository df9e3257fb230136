"""Oracle: causal depthwise convolution, tap by tap."""

from __future__ import annotations

import torch


def naive_short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     initial_state: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = b + sum_i w[:, K-1-i] * x_{t-i}; x_{t<0} come from `initial_state` (B, K-1, C), else zeros."""
    k = weight.shape[1]
    past = initial_state if initial_state is not None else x.new_zeros(x.shape[0], k - 1, x.shape[2])
    full = torch.cat([past, x], dim=1)
    t = x.shape[1]
    y = sum(weight[:, k - 1 - i] * full[:, k - 1 - i : k - 1 - i + t] for i in range(k))
    return y + bias if bias is not None else y
