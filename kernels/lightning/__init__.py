"""TNL lightning attention: linear attention with a per-head exponential decay, O = (QK^T * M) V."""

from __future__ import annotations

import math

import torch

from hylo.kernels.dispatch import choose_backend
from hylo.kernels.lightning.chunk import chunk_lightning_attention
from hylo.kernels.lightning.naive import naive_lightning_attention
from hylo.kernels.lightning.step import lightning_step
from hylo.kernels.varlen import packed, split_documents

__all__ = ["lightning_attention", "lightning_step", "tnl_slopes", "naive_lightning_attention",
           "chunk_lightning_attention"]


def _alibi_slopes(n: int) -> list[float]:
    if math.log2(n).is_integer():
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]
    p = 2 ** math.floor(math.log2(n))  # ALiBi's rule for head counts that are not powers of two: interleave
    return _alibi_slopes(p) + _alibi_slopes(2 * p)[0::2][: n - p]


def tnl_slopes(n_heads: int, layer_idx: int, n_layers: int) -> torch.Tensor:
    """TNL's decay slopes s_h for one layer: ALiBi-style per head, scaled by (1 - l/(L-1) + 1e-5) so the first
    layer decays fastest and the last barely at all.  float32, shape (n_heads,)."""
    if not 0 <= layer_idx < n_layers:
        raise ValueError(f"layer_idx={layer_idx} outside 0..{n_layers - 1}")
    scale = 1 - layer_idx / max(n_layers - 1, 1) + 1e-5
    return torch.tensor(_alibi_slopes(n_heads), dtype=torch.float32) * scale


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor, *,
                        initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                        backend: str = "auto", cu_seqlens: torch.Tensor | None = None
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, T, H, d), v (B, T, H, e), decay (H,) slopes >= 0 -> (B, T, H, e).

    O_i = sum_{j<=i} exp(-s_h (i-j)) (q_i . k_j) v_j  [+ exp(-s_h (i+1)) q_i S0 with an `initial_state` S0].
    `output_final_state=True` also returns the state after the last token, (B, H, d, e) in float32 (float64 for
    float64 inputs): feed it as the next segment's `initial_state`.
    backend: "naive" | "chunk" | "triton" | "auto" (Triton for CUDA tensors when it can run them: q, k, v of one
    dtype, not float64, and no gradient wanted for `decay`, which the Triton path treats as a constant; the chunk
    path otherwise).  `cu_seqlens`: packed documents (batch 1, kernels/varlen.py), each starting from a zero
    state; `initial_state` applies to the first document, the final state is the last document's.
    """
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"lightning_attention expects q, k (B, T, H, d) and v (B, T, H, e); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if decay.shape != (q.shape[2],):
        raise ValueError(f"decay must have shape (heads,) = ({q.shape[2]},), got {tuple(decay.shape)}")
    # Checked eagerly on CPU tensors only: on GPUs it would sync every call, and compiled graphs cannot branch on it
    if decay.device.type == "cpu" and not torch.compiler.is_compiling() and bool((decay < 0).any()):
        raise ValueError("decay slopes must be >= 0 (lambda = exp(-s) <= 1)")
    state_shape = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"initial_state must have shape (B, H, d, e) = {state_shape}, got "
                         f"{tuple(initial_state.shape)}")
    cu_seqlens = packed(cu_seqlens, q, "lightning_attention")
    backend = choose_backend("lightning_attention", backend, ("naive", "chunk", "triton"), (q, k, v),
                             triton_ok=lambda: not decay.requires_grad)
    if backend == "triton":
        from hylo.kernels.lightning.triton import triton_lightning_attention  # imports triton: only when asked for

        # packed documents too: the kernels restart at each document themselves
        return triton_lightning_attention(q, k, v, decay, initial_state, output_final_state, cu_seqlens)
    if cu_seqlens is not None:  # the PyTorch paths: each document on its own
        outs, state = [], initial_state
        for i, (qd, kd, vd) in enumerate(split_documents(cu_seqlens, "lightning_attention", q, k, v)):
            out, state = lightning_attention(qd, kd, vd, decay, initial_state=state if i == 0 else None,
                                             output_final_state=True, backend=backend)  # then from zero
            outs.append(out)
        return (torch.cat(outs, dim=1), state) if output_final_state else torch.cat(outs, dim=1)
    if backend == "naive":
        out, final = naive_lightning_attention(q, k, v, decay, initial_state)
    else:
        out, final = chunk_lightning_attention(q, k, v, decay, initial_state)
    return (out, final) if output_final_state else out
