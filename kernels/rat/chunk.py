"""RAT with O(T) memory: the in-chunk scan as L vectorised steps over all chunks at once, and the cross-chunk
softmax as causal attention at chunk granularity (the L queries of a chunk share its position), merged with each
query's own running key through the log-sum-exp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.attention.chunk import chunk_attention
from kernels.dispatch import compute_dtype


def _scan_chunks(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x, gate (B, N, L, H, d): the gated recurrence inside each chunk, all chunks in parallel."""
    steps, acc = [], None
    for x_l, g in zip(x.unbind(2), gate.unbind(2), strict=True):
        acc = (1 - g) * x_l if acc is None else g * acc + (1 - g) * x_l
        steps.append(acc)
    return torch.stack(steps, dim=2)


def scan_summaries(k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, chunk_size: int):
    """The last scanned key/value of every chunk: (B, T/L, H, d) each.  T must be a multiple of chunk_size."""
    b, t, h, _ = k.shape
    n = t // chunk_size
    kc, vc, gc = (x.view(b, n, chunk_size, h, -1) for x in (k, v, gate))
    return _scan_chunks(kc, gc)[:, :, -1], _scan_chunks(vc, gc)[:, :, -1]


def chunk_rat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, chunk_size: int,
                        scale: float | None = None,
                        prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`prefix` = (k, v) summaries (B, P, H, d) of P chunks that precede this segment (context parallelism:
    the chunks held by other ranks); every query also attends to them."""
    b, t, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    compute = compute_dtype(q.dtype)
    L = chunk_size
    n = -(-t // L)
    pad = n * L - t  # a partial last chunk: its summary is never read (no chunk comes after it)
    qc, kc, vc, gc = (F.pad(x.to(compute), (0, 0, 0, 0, 0, pad)).view(b, n, L, h, -1) for x in (q, k, v, gate))
    k_scan, v_scan = _scan_chunks(kc, gc), _scan_chunks(vc, gc)
    self_logit = (qc * k_scan).sum(-1) * scale  # (B, N, L, H)
    k_sum, v_sum = k_scan[:, :-1, L - 1], v_scan[:, :-1, L - 1]
    first = 1  # chunk 0 without a prefix has no earlier chunk: its queries see only their own running key
    if prefix is not None and prefix[0].shape[1] > 0:
        k_sum = torch.cat([prefix[0].to(compute), k_sum], dim=1)
        v_sum = torch.cat([prefix[1].to(compute), v_sum], dim=1)
        first = 0
    parts = [v_scan[:, :1]] if first else []
    if n > first:
        # Queries of chunks first..N-1 against the summaries of all earlier chunks, causally at chunk
        # granularity: the L queries of a chunk share one position (query_group=L), so no key is copied.
        o_cross, lse = chunk_attention(qc[:, first:].reshape(b, (n - first) * L, h, d), k_sum, v_sum,
                                       causal=True, scale=scale, query_group=L)
        o_cross = o_cross.view(b, n - first, L, h, -1)
        lse = lse.view(b, h, n - first, L).permute(0, 2, 3, 1)  # (B, N', L, H)
        s_self = self_logit[:, first:]
        top = torch.maximum(lse, s_self)  # the self logit is finite: pivot on it, never on -inf
        w_cross, w_self = torch.exp(lse - top)[..., None], torch.exp(s_self - top)[..., None]
        parts.append((w_cross * o_cross + w_self * v_scan[:, first:]) / (w_cross + w_self))
    out = torch.cat(parts, dim=1)
    return out.reshape(b, n * L, h, -1)[:, :t].to(q.dtype)
