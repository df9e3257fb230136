"""RAT with O(T) memory: the in-chunk scan as L vectorised steps over all chunks at once, and the cross-chunk
softmax as causal attention at chunk granularity (the L queries of a chunk share its position), merged with each
query's own running key through the log-sum-exp.

RoPE (`rope_theta`) rotates after the scan, by chunk index: the queries of chunk c and the summary of chunk j
turn by c and j, so their logit sees j - c.  A query and its own scanned key share the chunk and the angle, which
cancels: the own logit is the plain q . k~.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hylo.kernels.attention import attention
from hylo.kernels.attention.chunk import chunk_attention
from hylo.kernels.dispatch import compute_dtype
from hylo.kernels.rope import apply_rope, rope_table


def _scan_chunks(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x, gate (B, N, L, H, d): the gated recurrence inside each chunk, all chunks in parallel."""
    steps, acc = [], None
    for x_l, g in zip(x.unbind(2), gate.unbind(2), strict=True):
        acc = (1 - g) * x_l if acc is None else g * acc + (1 - g) * x_l
        steps.append(acc)
    return torch.stack(steps, dim=2)


def scan_summaries(k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, chunk_size: int):
    """The last scanned key/value of every chunk, not rotated: (B, T/L, H, d) each, fp32 for 16-bit inputs.  T must
    be a multiple of chunk_size."""
    b, t, h, _ = k.shape
    n = t // chunk_size
    compute = compute_dtype(k.dtype)  # 16-bit inputs scan in fp32, as every other path does
    kc, vc, gc = (x.to(compute).reshape(b, n, chunk_size, h, -1) for x in (k, v, gate))
    return _scan_chunks(kc, gc)[:, :, -1], _scan_chunks(vc, gc)[:, :, -1]


def rotate_by_chunk(x: torch.Tensor, first_chunk: int, theta: float | None) -> torch.Tensor:
    """x (B, N, ..., d): entry n rotated as chunk first_chunk + n (unchanged when theta is None)."""
    if theta is None or x.shape[1] == 0:
        return x
    cos, sin = rope_table(first_chunk + x.shape[1], x.shape[-1], theta, x.dtype, x.device)
    shape = (x.shape[1],) + (1,) * (x.dim() - 3) + (x.shape[-1] // 2,)
    return apply_rope(x, cos[first_chunk:].view(shape), sin[first_chunk:].view(shape))


def chunk_rat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, chunk_size: int,
                        scale: float | None = None, prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                        rope_theta: float | None = None, cross: str = "chunk") -> torch.Tensor:
    """`prefix` = (k, v) summaries (B, P, H, d) of P chunks that precede this segment (context parallelism:
    the chunks held by other ranks); every query also attends to them, and this segment's chunks count from P.
    `cross`: how the softmax over chunk summaries runs — "chunk" (blockwise, the L queries of a chunk sharing one
    position) or "flash" (one call of attention's flash backend: the L in-chunk offsets become L query heads per
    key head, so grouped-query heads share the summaries and the bottom-right causal mask is exactly "chunk c sees
    the chunks before it"; operands in the inputs' dtype)."""
    b, t, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    compute = compute_dtype(q.dtype)
    L = chunk_size
    n = -(-t // L)
    pad = n * L - t  # a partial last chunk: its summary is never read (no chunk comes after it)
    qc, kc, vc, gc = (F.pad(x.to(compute), (0, 0, 0, 0, 0, pad)).view(b, n, L, h, -1) for x in (q, k, v, gate))
    k_scan, v_scan = _scan_chunks(kc, gc), _scan_chunks(vc, gc)
    self_logit = (qc * k_scan).sum(-1) * scale  # (B, N, L, H): the rotation cancels (same chunk)
    n_prefix = 0 if prefix is None else prefix[0].shape[1]
    k_sum = rotate_by_chunk(k_scan[:, :-1, L - 1], n_prefix, rope_theta)
    v_sum = v_scan[:, :-1, L - 1]
    first = 1  # chunk 0 without a prefix has no earlier chunk: its queries see only their own running key
    if n_prefix:
        k_sum = torch.cat([rotate_by_chunk(prefix[0].to(compute), 0, rope_theta), k_sum], dim=1)
        v_sum = torch.cat([prefix[1].to(compute), v_sum], dim=1)
        first = 0
    parts = [v_scan[:, :1]] if first else []
    if n > first:
        # Queries of chunks first..N-1 against the summaries of all earlier chunks, causally at chunk
        # granularity: the L queries of a chunk share one position (query_group=L), so no key is copied.
        q_rot = rotate_by_chunk(qc[:, first:], n_prefix + first, rope_theta)
        if cross == "flash":
            heads = q_rot.transpose(2, 3).reshape(b, n - first, h * L, d).to(q.dtype)  # head h*L + r: offset r
            o_cross, lse = attention(heads, k_sum.to(q.dtype), v_sum.to(q.dtype), causal=True, scale=scale,
                                     return_lse=True, backend="flash")
            o_cross = o_cross.view(b, n - first, h, L, -1).transpose(2, 3).to(compute)
            lse = lse.view(b, h, L, n - first).permute(0, 3, 2, 1).to(compute)  # (B, N', L, H)
        else:
            o_cross, lse = chunk_attention(q_rot.reshape(b, (n - first) * L, h, d), k_sum, v_sum,
                                           causal=True, scale=scale, query_group=L)
            o_cross = o_cross.view(b, n - first, L, h, -1)
            lse = lse.view(b, h, n - first, L).permute(0, 2, 3, 1)  # (B, N', L, H)
        s_self = self_logit[:, first:]
        top = torch.maximum(lse, s_self)  # the self logit is finite: pivot on it, never on -inf
        w_cross, w_self = torch.exp(lse - top)[..., None], torch.exp(s_self - top)[..., None]
        parts.append((w_cross * o_cross + w_self * v_scan[:, first:]) / (w_cross + w_self))
    out = torch.cat(parts, dim=1)
    return out.reshape(b, n * L, h, -1)[:, :t].to(q.dtype)
