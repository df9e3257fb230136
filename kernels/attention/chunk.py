"""Softmax attention in query blocks, flash-attention style, in plain PyTorch.

Forward keeps only the output and the per-query log-sum-exp; backward recomputes each block's probabilities.
Memory is O(T) beyond one block's scores, and a sliding window only ever touches the keys inside it, so the
cost is O(T*W) for window layers.  The log-sum-exp is a differentiable output (ring attention and RAT merge
partial results through it), and the learned sink logits get their gradient.

Layout inside: q (B, Hkv, G, Tq, d) with G = H // Hkv query heads per k/v head, so grouped-query attention
broadcasts k/v instead of repeating them.  Query i sits at key position i // query_group + offset, where
offset = Tk - ceil(Tq / query_group) puts the last queries at the last keys (query_group > 1 lets RAT's L
queries per chunk share one causal position without copying the keys L times).
"""

from __future__ import annotations

import torch

from hylo.kernels.dispatch import compute_dtype

BLOCK = 256


class Layout:
    """Where queries and keys sit: key j at position k_start + j, query i at q_start + i // query_group.

    By default the queries are the last positions (q_start = Tk - ceil(Tq / query_group), k_start = 0); ring
    attention passes explicit starts for a pair of sequence segments held by different ranks.
    """

    def __init__(self, t_q: int, t_k: int, causal: bool = True, window: int | None = None, n_pinned: int = 0,
                 query_group: int = 1, q_start: int | None = None, k_start: int = 0):
        self.t_q, self.t_k, self.causal, self.window = t_q, t_k, causal, window
        self.n_pinned, self.group, self.k_start = n_pinned, query_group, k_start
        self.q_start = t_k - -(-t_q // query_group) if q_start is None else q_start

    def block(self, s: int, e: int, device: torch.device):
        """Queries [s, e): (range of contiguous key indices [lo, hi), pinned keys before lo, mask or None)."""
        i = torch.arange(s, e, device=device) // self.group + self.q_start
        first, last = s // self.group + self.q_start, (e - 1) // self.group + self.q_start
        hi = min(self.t_k, last - self.k_start + 1) if self.causal else self.t_k
        lo = max(0, first - self.window + 1 - self.k_start) if self.window is not None else 0
        hi = max(hi, lo)
        n_pin = min(self.n_pinned, lo) if self.window is not None else 0
        idx = torch.cat([torch.arange(n_pin, device=device), torch.arange(lo, hi, device=device)])
        j = (idx + self.k_start)[None, :]
        mask = j <= i[:, None] if self.causal else torch.ones(e - s, len(idx), dtype=torch.bool, device=device)
        if self.window is not None:
            mask = mask & ((i[:, None] - j < self.window) | (j < self.n_pinned))
        # Whether every (query, key) pair of the block is visible, from the integers alone: reading the mask
        # back (`mask.all()`) would sync the host and break torch.compile's graph.
        all_seen = ((not self.causal or hi - 1 + self.k_start <= first)
                    and (self.window is None or last - (lo + self.k_start) < self.window))
        return lo, hi, n_pin, (None if all_seen else mask)


def _keys(x: torch.Tensor, lo: int, hi: int, n_pin: int) -> torch.Tensor:
    return x[:, :, :, lo:hi] if n_pin == 0 else torch.cat([x[:, :, :, :n_pin], x[:, :, :, lo:hi]], dim=3)


def _scores(qb, kb, mask, scale):
    s = torch.matmul(qb, kb.transpose(-1, -2)) * scale
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def block_forward(q, k, v, scale: float, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hkv, G, Tq, d), k/v (B, Hkv, 1, Tk, d) -> out, lse (B, Hkv, G, Tq); rows that see no key get
    out 0 and lse -inf.  No sink: callers add it once, after merging partial results."""
    b, h_kv, g, t_q, _ = q.shape
    out = torch.zeros(b, h_kv, g, t_q, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((b, h_kv, g, t_q), float("-inf"), dtype=q.dtype, device=q.device)
    for s in range(0, t_q, BLOCK):
        e = min(s + BLOCK, t_q)
        lo, hi, n_pin, mask = layout.block(s, e, q.device)
        if hi - lo + n_pin == 0:
            continue
        scores = _scores(q[:, :, :, s:e], _keys(k, lo, hi, n_pin), mask, scale)
        block_lse = torch.logsumexp(scores, dim=-1)
        safe = block_lse.masked_fill(torch.isinf(block_lse), 0)[..., None]  # fully masked rows: exp(-inf) = 0
        out[:, :, :, s:e] = torch.matmul(torch.exp(scores - safe), _keys(v, lo, hi, n_pin))
        lse[:, :, :, s:e] = block_lse
    return out, lse


def block_backward(q, k, v, d_out, delta, lse, scale: float, layout: Layout):
    """Gradients of one (queries, keys) pair given the *final* lse (all keys and the sink) and
    delta = rowsum(dO * O) - dlse.  Returns dq (like q), dk, dv (B, Hkv, 1, Tk, d)."""
    dq = torch.zeros_like(q)
    dk = torch.zeros(k.shape[0], k.shape[1], k.shape[3], k.shape[-1], dtype=q.dtype, device=q.device)
    dv = torch.zeros(v.shape[0], v.shape[1], v.shape[3], v.shape[-1], dtype=q.dtype, device=q.device)
    for s in range(0, q.shape[3], BLOCK):
        e = min(s + BLOCK, q.shape[3])
        lo, hi, n_pin, mask = layout.block(s, e, q.device)
        if hi - lo + n_pin == 0:
            continue
        kb, vb = _keys(k, lo, hi, n_pin), _keys(v, lo, hi, n_pin)
        qb, dob = q[:, :, :, s:e], d_out[:, :, :, s:e]
        p = torch.exp(_scores(qb, kb, mask, scale) - lse[:, :, :, s:e, None])
        ds = p * (torch.matmul(dob, vb.transpose(-1, -2)) - delta[:, :, :, s:e, None])
        dq[:, :, :, s:e] = torch.matmul(ds, kb) * scale
        dk_b = (torch.matmul(ds.transpose(-1, -2), qb) * scale).sum(2)
        dv_b = torch.matmul(p.transpose(-1, -2), dob).sum(2)
        dk[:, :, lo:hi] += dk_b[:, :, n_pin:]
        dv[:, :, lo:hi] += dv_b[:, :, n_pin:]
        if n_pin:
            dk[:, :, :n_pin] += dk_b[:, :, :n_pin]
            dv[:, :, :n_pin] += dv_b[:, :, :n_pin]
    return dq, dk[:, :, None], dv[:, :, None]


def add_sink(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor | None):
    """Join the sink logits (Hkv, G) into finished (out, lse): the sink takes mass and gives no value."""
    if sink is None:
        return out, lse
    total = torch.logaddexp(lse, sink[:, :, None])
    return out * torch.exp(lse - total)[..., None], total


def sink_grad(sink: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """d loss / d sink = -sum_t p_sink,t * delta_t, with p_sink = exp(b - lse)."""
    return -(torch.exp(sink[None, :, :, None] - lse) * delta).sum(dim=(0, 3))


def grad_delta(d_out, out, d_lse):
    delta = (d_out * out).sum(-1)
    return delta if d_lse is None else delta - d_lse


class BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, scale, layout: Layout):
        out, lse = add_sink(*block_forward(q, k, v, scale, layout), sink)
        ctx.save_for_backward(q, k, v, sink, out, lse)
        ctx.scale, ctx.layout = scale, layout
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, sink, out, lse = ctx.saved_tensors
        d_out = torch.zeros_like(out) if d_out is None else d_out
        delta = grad_delta(d_out, out, d_lse)  # the part of dS shared by every key of a query
        dq, dk, dv = block_backward(q, k, v, d_out, delta, lse, ctx.scale, ctx.layout)
        d_sink = sink_grad(sink, lse, delta) if sink is not None and ctx.needs_input_grad[3] else None
        return dq, dk, dv, d_sink, None, None


def to_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor | None):
    """(B, T, H, d) tensors -> the grouped layout q (B, Hkv, G, Tq, d), k/v (B, Hkv, 1, Tk, d), sink (Hkv, G),
    in the compute dtype (float32 for half inputs)."""
    b, t_q, h, d = q.shape
    h_kv = k.shape[2]
    compute = compute_dtype(q.dtype)
    qg = q.to(compute).transpose(1, 2).reshape(b, h_kv, h // h_kv, t_q, d)
    kg = k.to(compute).transpose(1, 2)[:, :, None]
    vg = v.to(compute).transpose(1, 2)[:, :, None]
    sink_g = None if sink is None else sink.to(compute).view(h_kv, h // h_kv)
    return qg, kg, vg, sink_g


def from_groups(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype):
    b, h_kv, g, t_q, e = out.shape
    return out.reshape(b, h_kv * g, t_q, e).transpose(1, 2).to(dtype), lse.reshape(b, h_kv * g, t_q)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    window: int | None = None, sink: torch.Tensor | None = None, scale: float | None = None,
                    n_pinned: int = 0, query_group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Tq, H, d), k/v (B, Tk, Hkv, d) -> (out (B, Tq, H, d), lse (B, H, Tq)); queries are the last Tq
    positions (or, with query_group g, the last ceil(Tq/g) positions, g consecutive queries per position)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    layout = Layout(q.shape[1], k.shape[1], causal, window, n_pinned, query_group)
    out, lse = BlockAttention.apply(*to_groups(q, k, v, sink), scale, layout)
    return from_groups(out, lse, q.dtype)
