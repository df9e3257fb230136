"""Lightning attention in blocks: intra-block as a masked, decayed product; inter-block through a decayed
k^T v state carried from block to block.  Memory O(T*C + (T/C)*d*e).

Every exponent is of a non-negative offset (exp(-s*n), n >= 0): the textbook form with exp(+s*j) overflows fp32
at s*j > 88.  Long sequences run segment by segment with the state passed between them, which keeps the
working set in cache (time stays linear in T on a CPU) and is the same state passing context parallelism uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hylo.kernels.dispatch import compute_dtype

BLOCK = 64
SEGMENT = 2048


def _segment(q, k, v, s, state, c):
    """One segment (B, T, H, .) in the compute dtype; s (H,) slopes; state (B, H, d, e) entering it."""
    b, t, h, d = q.shape
    e = v.shape[-1]
    n = -(-t // c)
    pad = n * c - t  # zero keys/values add nothing, zero queries read nothing: pad then cut
    qb, kb, vb = (F.pad(x, (0, 0, 0, 0, 0, pad)).view(b, n, c, h, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v))
    s = s[:, None, None]  # (H, 1, 1)
    offs = torch.arange(c, device=q.device, dtype=q.dtype)
    dist = offs[:, None] - offs[None, :]
    intra_mask = torch.exp(-s * dist.clamp(min=0)) * (dist >= 0)  # (H, C, C): lambda^(i-j), j <= i
    q_decay = torch.exp(-s * (offs + 1)[:, None])  # (H, C, 1): lambda^(i+1), reading the state left by block n-1
    k_decay = torch.exp(-s * (c - 1 - offs)[:, None])  # (H, C, 1): lambda^(C-1-j), writing into the state
    block_decay = torch.exp(-s * c)  # (H, 1, 1)

    out = torch.matmul(torch.matmul(qb, kb.transpose(-1, -2)) * intra_mask[:, None], vb)
    kv_new = torch.matmul((kb * k_decay[:, None]).transpose(-1, -2), vb)  # (B, H, N, d, e): each block's k^T v
    states = [state]
    for kv in kv_new.unbind(2)[:-1]:  # unbind, not kv_new[:, :, i]: each index's backward would fill a full copy
        states.append(states[-1] * block_decay + kv)
    out = out + torch.matmul(qb, torch.stack(states, dim=2)) * q_decay[:, None]
    # The state after the last real token: the last block holds r = c - pad of them.
    r = c - pad
    last_decay = torch.exp(-s * (r - 1 - offs).clamp(min=0)[:, None])  # padded rows have k = 0
    final = states[-1] * torch.exp(-s * r) + torch.matmul((kb[:, :, -1] * last_decay).transpose(-1, -2), vb[:, :, -1])
    return out.permute(0, 2, 3, 1, 4).reshape(b, n * c, h, e)[:, :t], final


def chunk_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                              initial_state: torch.Tensor | None = None, block: int = BLOCK,
                              segment: int = SEGMENT) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (B, T, H, e) in q's dtype, final state (B, H, d, e) in the compute dtype)."""
    b, t, h, d = q.shape
    compute = compute_dtype(q.dtype)
    state = (torch.zeros(b, h, d, v.shape[-1], dtype=compute, device=q.device) if initial_state is None
             else initial_state.to(compute))
    s = decay.to(compute)
    outs = []
    # split, not q[:, a:b]: every slice's backward would allocate a zero gradient of the whole sequence
    for qs, ks, vs in zip(*(x.to(compute).split(segment, dim=1) for x in (q, k, v)), strict=True):
        out, state = _segment(qs, ks, vs, s, state, min(block, t))
        outs.append(out)
    return torch.cat(outs, dim=1).to(q.dtype), state
