"""Softmax attention in query blocks, flash-attention style, in plain PyTorch.

Forward keeps only the output and the per-query log-sum-exp; backward recomputes each block's probabilities.
Memory is O(T) beyond one block's scores, and a sliding window only ever touches the keys inside it, so the
cost is O(T*W) for window layers.  The log-sum-exp is a differentiable output (ring attention and RAT merge
partial results through it), and the learned sink logits get their gradient.

Layout inside: q (B, Hkv, G, T, d) with G = H // Hkv query heads per k/v head, so grouped-query attention
broadcasts k/v instead of repeating them.
"""

from __future__ import annotations

import torch

BLOCK = 128


def _key_index(q_lo: int, q_hi: int, t_k: int, causal: bool, window: int | None, n_pinned: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Key positions a query block [q_lo, q_hi) (global positions) can see, and their visibility mask."""
    hi = min(t_k, q_hi) if causal else t_k
    lo = max(0, q_lo - window + 1) if window is not None else 0
    keys = torch.arange(lo, hi, device=device)
    if n_pinned and lo > 0:
        keys = torch.cat([torch.arange(min(n_pinned, lo), device=device), keys])
    i = torch.arange(q_lo, q_hi, device=device)[:, None]
    j = keys[None, :]
    mask = j <= i if causal else torch.ones(len(i), len(keys), dtype=torch.bool, device=device)
    if window is not None:
        mask = mask & ((i - j < window) | (j < n_pinned))
    return keys, (None if bool(mask.all()) else mask)


def _scores(qb, kb, mask, scale):
    s = torch.matmul(qb, kb.transpose(-1, -2)) * scale
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


class BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, scale, causal, window, n_pinned):
        b, h_kv, g, t_q, d = q.shape
        t_k, offset = k.shape[3], k.shape[3] - t_q
        out = torch.empty(b, h_kv, g, t_q, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h_kv, g, t_q, dtype=q.dtype, device=q.device)
        for s in range(0, t_q, BLOCK):
            e = min(s + BLOCK, t_q)
            keys, mask = _key_index(s + offset, e + offset, t_k, causal, window, n_pinned, q.device)
            kb, vb = k.index_select(3, keys), v.index_select(3, keys)
            scores = _scores(q[:, :, :, s:e], kb, mask, scale)
            block_lse = torch.logsumexp(scores, dim=-1)
            if sink is not None:
                block_lse = torch.logaddexp(block_lse, sink[:, :, None])
            out[:, :, :, s:e] = torch.matmul(torch.exp(scores - block_lse[..., None]), vb)
            lse[:, :, :, s:e] = block_lse
        ctx.save_for_backward(q, k, v, sink, out, lse)
        ctx.args = (scale, causal, window, n_pinned)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, sink, out, lse = ctx.saved_tensors
        scale, causal, window, n_pinned = ctx.args
        t_q, t_k = q.shape[3], k.shape[3]
        offset = t_k - t_q
        d_out = torch.zeros_like(out) if d_out is None else d_out
        # delta_t = rowsum(dO * O) - dlse: the part of dS shared by every key of query t.
        delta = (d_out * out).sum(-1)
        if d_lse is not None:
            delta = delta - d_lse
        dq = torch.zeros_like(q)
        dk = torch.zeros(k.shape[0], k.shape[1], t_k, k.shape[-1], dtype=q.dtype, device=q.device)
        dv = torch.zeros(v.shape[0], v.shape[1], t_k, v.shape[-1], dtype=q.dtype, device=q.device)
        for s in range(0, t_q, BLOCK):
            e = min(s + BLOCK, t_q)
            keys, mask = _key_index(s + offset, e + offset, t_k, causal, window, n_pinned, q.device)
            kb, vb = k.index_select(3, keys), v.index_select(3, keys)
            qb, dob = q[:, :, :, s:e], d_out[:, :, :, s:e]
            p = torch.exp(_scores(qb, kb, mask, scale) - lse[:, :, :, s:e, None])
            dp = torch.matmul(dob, vb.transpose(-1, -2))
            ds = p * (dp - delta[:, :, :, s:e, None])
            dq[:, :, :, s:e] = torch.matmul(ds, kb) * scale
            dk.index_add_(2, keys, (torch.matmul(ds.transpose(-1, -2), qb) * scale).sum(2))
            dv.index_add_(2, keys, torch.matmul(p.transpose(-1, -2), dob).sum(2))
        d_sink = None
        if sink is not None and ctx.needs_input_grad[3]:
            d_sink = -(torch.exp(sink[None, :, :, None] - lse) * delta).sum(dim=(0, 3))
        return dq, dk[:, :, None], dv[:, :, None], d_sink, None, None, None, None


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    window: int | None = None, sink: torch.Tensor | None = None, scale: float | None = None,
                    n_pinned: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Tq, H, d), k/v (B, Tk, Hkv, d) -> (out (B, Tq, H, d), lse (B, H, Tq)); queries are the last Tq."""
    b, t_q, h, d = q.shape
    h_kv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qg = q.to(compute).transpose(1, 2).reshape(b, h_kv, h // h_kv, t_q, d)
    kg = k.to(compute).transpose(1, 2)[:, :, None]
    vg = v.to(compute).transpose(1, 2)[:, :, None]
    sink_g = None if sink is None else sink.to(compute).view(h_kv, h // h_kv)
    out, lse = BlockAttention.apply(qg, kg, vg, sink_g, scale, causal, window, n_pinned)
    out = out.reshape(b, h, t_q, -1).transpose(1, 2).to(q.dtype)
    return out, lse.reshape(b, h, t_q)
