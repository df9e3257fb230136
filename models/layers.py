"""Building blocks shared by the LM and its mixers: norms and channel mixers (MLPs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.dispatch import upcast


class RMSNorm(nn.Module):
    """RMSNorm; `weight=False` gives TNL's SRMSNorm (x * rsqrt(mean x^2 + eps), nothing learned)."""

    def __init__(self, dim: int, eps: float, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(upcast(x).dtype)
        return F.rms_norm(upcast(x), (x.shape[-1],), w, self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.down.is_residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class SGLU(SwiGLU):
    """TNL's simple GLU: W3(W1 x * W2 x), no activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.gate_up(x).chunk(2, dim=-1)
        return self.down(a * b)


class GeluMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.down.is_residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


MLPS = {"swiglu": SwiGLU, "sglu": SGLU, "gelu": GeluMLP}


def ffn_width(cfg) -> int:
    """model.ffn_dim, or the default: 4 * d_model for GELU, 8/3 * d_model (rounded up to 64) for gated MLPs."""
    if cfg.ffn_dim:
        return cfg.ffn_dim
    if cfg.mlp == "gelu":
        return 4 * cfg.d_model
    return 64 * -(-8 * cfg.d_model // (3 * 64))
