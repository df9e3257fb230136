"""Building blocks shared by the LM and its mixers: norms and channel mixers (MLPs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hylo.kernels.dispatch import upcast


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


class _TiledMLP(torch.autograd.Function):
    """The MLP over sequence tiles of `tile` tokens, keeping only its input: forward runs each tile without a graph,
    backward recomputes each tile and takes its gradients, so one tile's hidden activations exist at a time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mlp: nn.Module, tile: int, *weights: torch.Tensor) -> torch.Tensor:
        ctx.mlp, ctx.tile = mlp, tile
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([mlp(part) for part in x.split(tile, dim=1)], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        weights = [p for p in ctx.mlp.parameters() if p.requires_grad]
        grad_x = torch.empty_like(x)
        grad_w = [torch.zeros_like(w, dtype=torch.promote_types(w.dtype, torch.float32)) for w in weights]
        device, enabled, dtype = ctx.autocast
        for start in range(0, x.shape[1], ctx.tile):
            part = x[:, start:start + ctx.tile].detach().requires_grad_()
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                out = ctx.mlp(part)
            grads = torch.autograd.grad(out, [part, *weights], grad[:, start:start + ctx.tile])
            grad_x[:, start:start + ctx.tile] = grads[0]
            for total, g in zip(grad_w, grads[1:], strict=True):
                total += g
        return (grad_x, None, None, *(g.to(w.dtype) for g, w in zip(grad_w, weights, strict=True)))


def tiled_mlp(mlp: nn.Module, x: torch.Tensor, tile: int) -> torch.Tensor:
    """`mlp(x)` for x (batch, seq, d), `tile` tokens of each sequence at a time (0, or tile >= seq: at once).
    The weights are inputs of the autograd function, so data-parallel wrappers see their gradients arrive."""
    if tile <= 0 or tile >= x.shape[1] or not torch.is_grad_enabled():
        return mlp(x)
    return _TiledMLP.apply(x, mlp, tile, *(p for p in mlp.parameters() if p.requires_grad))


def ffn_width(cfg) -> int:
    """model.ffn_dim, or the default: 4 * d_model for GELU, 8/3 * d_model (rounded up to 64) for gated MLPs."""
    if cfg.ffn_dim:
        return cfg.ffn_dim
    if cfg.mlp == "gelu":
        return 4 * cfg.d_model
    return 64 * -(-8 * cfg.d_model // (3 * 64))
