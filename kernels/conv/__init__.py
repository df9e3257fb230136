"""Short causal depthwise convolution (BASED's BaseConv), with the previous K-1 inputs as a passable state."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hylo.kernels.conv.naive import naive_short_conv
from hylo.kernels.conv.step import short_conv_prefill, short_conv_step
from hylo.kernels.dispatch import choose_backend
from hylo.kernels.varlen import packed, split_documents

__all__ = ["short_conv", "short_conv_prefill", "short_conv_step", "naive_short_conv"]


def short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               initial_state: torch.Tensor | None = None, backend: str = "auto",
               cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, C), weight (C, K), bias (C,) -> (B, T, C): y_t = b + sum_i w[:, K-1-i] x_{t-i}.

    `initial_state` (B, K-1, C) holds the inputs just before x (a previous segment, or a neighbour's halo under
    context parallelism); zeros when None.  backend: "naive" | "chunk" | "auto".
    """
    k = weight.shape[1]
    cu_seqlens = packed(cu_seqlens, x, "short_conv")
    if cu_seqlens is not None:  # each document sees zeros before its first token (initial_state: the first's)
        return torch.cat([short_conv(xd, weight, bias, initial_state=initial_state if i == 0 else None,
                                     backend=backend)
                          for i, (xd,) in enumerate(split_documents(cu_seqlens, "short_conv", x))], dim=1)
    if initial_state is not None and initial_state.shape != (x.shape[0], k - 1, x.shape[2]):
        raise ValueError(f"initial_state must be (B, K-1, C) = {(x.shape[0], k - 1, x.shape[2])}, "
                         f"got {tuple(initial_state.shape)}")
    if choose_backend("short_conv", backend, ("naive", "chunk"), (x,)) == "naive":
        return naive_short_conv(x, weight, bias, initial_state)
    xt = x.transpose(1, 2)
    if initial_state is None:
        xt = F.pad(xt, (k - 1, 0))
    else:
        xt = torch.cat([initial_state.transpose(1, 2).to(x.dtype), xt], dim=-1)
    return F.conv1d(xt, weight[:, None, :].to(x.dtype), None if bias is None else bias.to(x.dtype),
                    groups=x.shape[2]).transpose(1, 2)
