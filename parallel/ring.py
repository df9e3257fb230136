"""Ring attention for full causal softmax attention with the zigzag layout.

K/V blocks travel around the ring with batch_isend_irecv while the local block is computed; partial results
merge by log-sum-exp in float32 (never rounded between steps); the learned sink joins the denominator once, after
the last step.  Zigzag (rank r holds chunks r and 2N-1-r) gives every rank the same causal work: of the four
(query chunk, key chunk) pairs per step, each is either fully visible, the causal diagonal, or skipped.
Backward sends K/V around again, with their dK/dV accumulators one hop behind, so each block's gradient returns
to its owner after N hops.

Packed documents (`cu_seqlens` of the whole sequence, parallel/layout.py's SequenceLayout): every segment is cut
at document boundaries, and a (query piece, key piece) pair is computed only when both pieces belong to the same
document, with the plain causal mask — pairs that share no document are skipped, so no cross-document work is
done and nothing needs a mask beyond causality.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hylo.kernels.attention import flash_usable
from hylo.kernels.attention.chunk import (
    Layout,
    add_sink,
    block_backward,
    block_forward,
    from_groups,
    grad_delta,
    sink_grad,
    to_groups,
)
from hylo.kernels.attention.flash import flash_problem
from hylo.kernels.dispatch import check_backend, choose_backend
from hylo.parallel.layout import COMM, Segment, sequence_layout


# One (query segment, key segment) pair, forward and backward, on the grouped layout q (B, Hkv, G, Tq, d),
# k/v (B, Hkv, 1, Tk, d): the blockwise PyTorch path, or the Triton flash kernels on views of the same tensors.
def _bthd(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1, 2).transpose(1, 2)  # (B, Hkv, G, T, d) -> (B, T, Hkv * G, d), a view


def _triton_spec(q, k, scale, layout: Layout):
    from hylo.kernels.attention.triton import make_spec

    return make_spec(q, k, causal=layout.causal, scale=scale, q_start=layout.q_start, k_start=layout.k_start)


def _triton_forward(q, k, v, scale: float, layout: Layout):
    from hylo.kernels.attention.triton import flash_forward

    qb, kb, vb = _bthd(q), _bthd(k), _bthd(v)
    out, lse = flash_forward(qb, kb, vb, _triton_spec(qb, kb, scale, layout))
    b, h_kv, g, t, _ = q.shape
    return out.transpose(1, 2).reshape(b, h_kv, g, t, -1), lse.view(b, h_kv, g, t)  # lse stays fp32


def _triton_backward(q, k, v, d_out, delta, lse, scale: float, layout: Layout):
    from hylo.kernels.attention.triton import flash_backward

    qb, kb, vb = _bthd(q), _bthd(k), _bthd(v)
    dq, dk, dv = flash_backward(qb, kb, vb, _bthd(d_out), delta.flatten(1, 2), lse.flatten(1, 2),
                                _triton_spec(qb, kb, scale, layout), grad_dtype=torch.float32)
    b, h_kv, g, t, _ = q.shape
    regroup = lambda x: x.transpose(1, 2)[:, :, None]  # noqa: E731  (B, Tk, Hkv, d) -> (B, Hkv, 1, Tk, d)
    return dq.transpose(1, 2).reshape(b, h_kv, g, t, -1), regroup(dk), regroup(dv)


def _flash_forward(q, k, v, scale: float, layout: Layout):
    from hylo.kernels.attention.flash import pair_forward

    return pair_forward(q, k, v, scale, layout)


def _flash_backward(q, k, v, d_out, delta, lse, scale: float, layout: Layout, out=None):
    from hylo.kernels.attention.flash import pair_backward

    return pair_backward(q, k, v, d_out, delta, lse, scale, layout, out=out)


PAIR_KERNELS = {"chunk": (block_forward, block_backward), "triton": (_triton_forward, _triton_backward),
                "flash": (_flash_forward, _flash_backward)}
BACKENDS = ("chunk", "triton", "flash")


Piece = tuple[int, int, int]  # (global start, length, document index): a segment's part inside one document


def _pairs(q_pieces: list[Piece], k_pieces: list[Piece]):
    """(q slice, k slice, Layout) for every (query piece, key piece) pair of one document with something visible."""
    q_off = 0
    for qs, qn, q_doc in q_pieces:
        k_off = 0
        for ks, kn, k_doc in k_pieces:
            if k_doc == q_doc and ks < qs + qn:  # the same document, some key at or before the last query
                causal = ks + kn > qs + 1  # some key after the first query: the diagonal
                layout = Layout(qn, kn, causal=causal, q_start=qs, k_start=ks)
                yield slice(q_off, q_off + qn), slice(k_off, k_off + kn), layout
            k_off += kn
        q_off += qn


class _Ring:
    def __init__(self, group: dist.ProcessGroup, segments: list[list[Segment]], key: str):
        self.group, self.segments, self.key = group, segments, key
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, buf: torch.Tensor, key: str):
        """Begin passing buf to the next rank; returns (requests, receive buffer)."""
        recv = torch.empty_like(buf)
        COMM.add(key, buf)
        ops = [dist.P2POp(dist.isend, buf, self.next), dist.P2POp(dist.irecv, recv, self.prev)]
        return dist.batch_isend_irecv(ops), recv


def _merge(out, lse, o, lse_b):
    new = torch.logaddexp(lse, lse_b)
    return out * torch.exp(lse - new)[..., None] + o * torch.exp(lse_b - new)[..., None], new


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, scale, ring: _Ring, backend: str, pieces: list[list[Piece]]):
        pair_forward = PAIR_KERNELS[backend][0]
        d = k.shape[-1]
        acc = torch.promote_types(q.dtype, torch.float32)  # partial results merge in fp32 even for bf16 inputs
        out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        kv = torch.cat([k, v], dim=-1).contiguous()
        mine = pieces[ring.rank]
        for step in range(ring.size):
            pending = ring.start(kv, ring.key) if step < ring.size - 1 else None  # overlap with the compute
            src = (ring.rank - step) % ring.size
            for qsl, ksl, layout in _pairs(mine, pieces[src]):
                o, lb = pair_forward(q[..., qsl, :], kv[..., ksl, :d], kv[..., ksl, d:], scale, layout)
                out[..., qsl, :], lse[..., qsl] = _merge(out[..., qsl, :], lse[..., qsl], o.to(acc), lb.to(acc))
            if pending:
                for req in pending[0]:
                    req.wait()
                kv = pending[1]
        out, lse = add_sink(out, lse, sink)
        ctx.set_materialize_grads(False)  # an unused lse gives no gradient (the flash pairs then need one call)
        ctx.save_for_backward(q, k, v, sink, out, lse)
        ctx.scale, ctx.ring, ctx.backend, ctx.pieces = scale, ring, backend, pieces
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, sink, out, lse = ctx.saved_tensors
        ring, scale, d = ctx.ring, ctx.scale, k.shape[-1]
        pair_backward = PAIR_KERNELS[ctx.backend][1]
        d_out = torch.zeros_like(out) if d_out is None else d_out
        delta = grad_delta(d_out, out, d_lse)
        d_out = d_out.to(q.dtype)  # the kernels' operand dtype (fp32 on the chunk path, which upcasts)
        dq = torch.zeros(q.shape, dtype=out.dtype, device=q.device)
        kv = torch.cat([k, v], dim=-1).contiguous()
        dkv = torch.zeros_like(kv, dtype=out.dtype)  # gradients accumulate in fp32 across the ring
        mine = ctx.pieces[ring.rank]
        for step in range(ring.size):
            src = (ring.rank - step) % ring.size
            for qsl, ksl, layout in _pairs(mine, ctx.pieces[src]):
                # the flash kernels' backward takes the merged output itself where no lse gradient joins delta
                merged = {"out": out[..., qsl, :]} if ctx.backend == "flash" and d_lse is None else {}
                g_q, g_k, g_v = pair_backward(q[..., qsl, :], kv[..., ksl, :d], kv[..., ksl, d:], d_out[..., qsl, :],
                                               delta[..., qsl], lse[..., qsl], scale, layout, **merged)
                dq[..., qsl, :] += g_q
                dkv[..., ksl, :] += torch.cat([g_k, g_v], dim=-1)
            if ring.size > 1:  # pass the block on with its gradient; after N hops dK/dV are home
                last = step == ring.size - 1  # the last hop only takes dK/dV home
                buf = dkv.contiguous() if last else torch.cat([kv, dkv], dim=-1).contiguous()
                reqs, recv = ring.start(buf, ring.key + "/backward")
                for req in reqs:
                    req.wait()
                # one buffer in fp32: k/v come back to their own (exactly representable) dtype
                kv, dkv = (kv, recv) if last else (recv[..., : kv.shape[-1]].to(k.dtype), recv[..., kv.shape[-1]:])
        d_sink = sink_grad(sink, lse, delta) if sink is not None and ctx.needs_input_grad[3] else None
        return dq.to(q.dtype), dkv[..., :d].to(k.dtype), dkv[..., d:].to(v.dtype), d_sink, None, None, None, None


class RingAttention:
    """`attention` (full causal) with the sequence split over a ring of ranks in the given segments.

    backend: "auto" (torch's FlashAttention kernels for 16-bit CUDA tensors where they pass their probe, else the
    Triton flash kernels for CUDA tensors they support, else the blockwise PyTorch path), "chunk", "triton" (which
    also runs on the CPU interpreter, how the tests check it) or "flash" (on the CPU: torch's CPU flash kernel)."""

    def __init__(self, group: dist.ProcessGroup, segments: list[list[Segment]], key: str = "ring",
                 backend: str = "auto"):
        check_backend("ring attention", backend, BACKENDS)
        self.ring, self.backend = _Ring(group, segments, key), backend

    def __call__(self, q, k, v, *, causal=True, window=None, sink=None, scale=None, return_lse=False, n_pinned=0,
                 cu_seqlens=None):
        if not causal or window is not None or n_pinned:
            raise ValueError("ring attention runs full causal attention; window layers use the halo exchange")
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        backend = choose_backend("ring attention", self.backend, BACKENDS, (q, k, v),
                                 triton_ok=lambda: _triton_supports(q, k, v), flash_ok=lambda: flash_usable(q, k, v))
        if backend == "flash" and (problem := flash_problem(q, k, v)):
            raise ValueError(f"ring attention: backend='flash' cannot take these inputs: {problem}")
        # The Triton and flash kernels take bf16/fp16 operands as they are (fp32 accumulation inside, fp32 merges
        # here); the blockwise PyTorch path computes in fp32.
        groups = _grouped(q, k, v, sink) if backend in ("triton", "flash") else to_groups(q, k, v, sink)
        layout = sequence_layout(self.ring.segments, cu_seqlens, q, self.ring.rank, "ring attention")
        pieces = [layout.pieces(r) for r in range(self.ring.size)]
        out, lse = _RingAttention.apply(*groups, scale, self.ring, backend, pieces)
        out, lse = from_groups(out, lse, q.dtype)
        return (out, lse) if return_lse else out


def _grouped(q, k, v, sink):
    """to_groups without the upcast: q (B, Hkv, G, Tq, d), k/v (B, Hkv, 1, Tk, d) in their own dtype."""
    b, t_q, h, d = q.shape
    h_kv = k.shape[2]
    sink_g = None if sink is None else sink.to(torch.promote_types(sink.dtype, torch.float32)).view(h_kv, h // h_kv)
    return (q.transpose(1, 2).reshape(b, h_kv, h // h_kv, t_q, d), k.transpose(1, 2)[:, :, None],
            v.transpose(1, 2)[:, :, None], sink_g)


def _triton_supports(q, k, v) -> bool:
    from hylo.kernels.attention.triton import supported

    return supported(q, k, v)
