"""Softmax attention on the FlashAttention kernels torch ships, with what they lack composed around them, exactly.

The kernel (one forward and one backward call):
  CUDA  FlashAttention-2, `aten._flash_attention_forward` / `_backward`: layout (B, T, H, d) as ours, grouped-query
        heads natively, causal masks aligned bottom-right (the queries are the last positions, as ours), sliding
        windows through `window_size_left`, packed documents through `cum_seq_q` / `cum_seq_k`.  Probed once per
        device against the blockwise path (`flash_problem`): a torch whose op lacks an argument or disagrees is
        never used silently.
  CPU   `aten._scaled_dot_product_flash_attention_for_cpu` and its backward, with an additive mask for what it
        lacks (a window, documents, fewer queries than keys); any float dtype, float64 included, so every
        composition below is tested against the oracle on the CPU.
Around it:
  sink    lse' = logaddexp(lse, sink), out' = out * exp(lse - lse').  The kernel's own backward, called with
          (out', lse'), recomputes the sink-normalised probabilities; d_sink = -sum_t exp(sink - lse'_t) delta_t.
  pinned  the first n_pinned keys of each document, for the queries whose window has passed them: a second, small
          part (queries x n_pinned scores) in PyTorch, merged by lse.  Each part's backward takes the merged
          (out, lse), as ring attention's steps do.
  lse     returned and differentiable: its gradient adds P * d_lse to the scores' gradient, which one more kernel
          backward gives (v = 0, dout = e_0, out = -d_lse e_0, so dP = 0 and D = -d_lse), only when lse is used.
Every query sees at least itself (causal) or every key (not causal), so no row is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hylo.kernels.dispatch import compute_dtype


@dataclass(frozen=True)
class Spec:
    causal: bool
    window: int | None  # itself and window-1 keys before it; None: all earlier keys
    scale: float
    n_pinned: int
    bounds: tuple[tuple[int, int], ...] | None  # packed documents (start, end), or None for one sequence per row
    # Positions of the first query and the first key (ring attention's pairs of segments); None: the queries are
    # the last positions of the keys.
    q_start: int | None = None
    k_start: int = 0

    def starts(self, t_q: int, t_k: int) -> tuple[int, int]:
        return (t_k - t_q if self.q_start is None else self.q_start), self.k_start


# ------------------------------------------------------------------------------------------------ the kernels
def _documents(spec: Spec) -> torch.Tensor | None:
    if spec.bounds is None:
        return None
    return torch.repeat_interleave(torch.arange(len(spec.bounds)), torch.tensor([e - s for s, e in spec.bounds]))


def _cpu_mask(spec: Spec, t_q: int, t_k: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive (t_q, t_k) mask the CPU op needs, or None where its own `is_causal` says it all."""
    q0, k0 = spec.starts(t_q, t_k)
    if spec.window is None and spec.bounds is None and ((q0 == k0 and t_q == t_k) or not spec.causal):
        return None
    i = torch.arange(q0, q0 + t_q)[:, None]
    j = torch.arange(k0, k0 + t_k)[None, :]
    seen = j <= i if spec.causal else torch.ones(t_q, t_k, dtype=torch.bool)
    if spec.window is not None:
        seen = seen & (i - j < spec.window)
    if (doc := _documents(spec)) is not None:
        seen = seen & (doc[i] == doc[j])
    return torch.zeros(t_q, t_k, dtype=dtype).masked_fill(~seen, float("-inf"))


def _fa_layout(q: torch.Tensor, k: torch.Tensor, spec: Spec) -> dict:
    """FlashAttention-2's arguments for this call (packed documents drop the batch dimension)."""
    if spec.bounds is None:
        return {"cum": None, "max_q": q.shape[1], "max_k": k.shape[1]}
    cum = torch.tensor([s for s, _ in spec.bounds] + [spec.bounds[-1][1]], dtype=torch.int32, device=q.device)
    longest = max(e - s for s, e in spec.bounds)
    return {"cum": cum, "max_q": longest, "max_k": longest}


def _fa_window(spec: Spec, t_q: int, t_k: int) -> tuple[bool, dict]:
    """(is_causal, window sizes): FA aligns a causal mask bottom-right; queries ending after the last key (a ring
    pair) see `right` more keys past that alignment, which is FA's local mode with an unbounded left side."""
    q0, k0 = spec.starts(t_q, t_k)
    right = (q0 + t_q) - (k0 + t_k)
    left = -1 if spec.window is None else spec.window - 1
    if not spec.causal:
        return False, {"window_size_left": -1, "window_size_right": -1}
    if right == 0:
        return True, {"window_size_left": left, "window_size_right": 0}
    if right < 0 or spec.window is not None:
        raise ValueError("flash attention: keys past the last query or a window with explicit positions")
    return False, {"window_size_left": -1, "window_size_right": right}


def _fa_lse(lse: torch.Tensor, q: torch.Tensor, spec: Spec) -> torch.Tensor:
    """FA's lse as (B, H, Tq): packed calls return it as (H, total) (FA >= 2.5) or padded (docs, H, longest)."""
    if spec.bounds is None:
        return lse[..., : q.shape[1]]
    if lse.dim() == 2:
        return lse[None]
    return torch.cat([lse[d, :, : e - s] for d, (s, e) in enumerate(spec.bounds)], dim=-1)[None]


def uses_flash_attention_2(q: torch.Tensor) -> bool:
    """Whether these tensors take FlashAttention-2's ops (CUDA) or the CPU flash op."""
    return q.is_cuda


def fa2_ops():
    """(forward, backward) of FlashAttention-2 as torch ships them."""
    return torch.ops.aten._flash_attention_forward, torch.ops.aten._flash_attention_backward


def kernel_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Spec):
    """(out (B, Tq, H, d), lse (B, H, Tq) in fp32 or fp64, what the backward needs besides)."""
    if uses_flash_attention_2(q):
        fa = _fa_layout(q, k, spec)
        squeeze = (lambda x: x[0]) if fa["cum"] is not None else (lambda x: x)
        causal, window = _fa_window(spec, q.shape[1], k.shape[1])
        out, lse, rng, unused, _ = fa2_ops()[0](
            squeeze(q), squeeze(k), squeeze(v), fa["cum"], fa["cum"], fa["max_q"], fa["max_k"], 0.0, causal, False,
            scale=spec.scale, **window)
        return out.view(q.shape[:-1] + v.shape[-1:]), _fa_lse(lse, q, spec), (lse, rng, unused)
    mask = _cpu_mask(spec, q.shape[1], k.shape[1], q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, spec.causal and mask is None, attn_mask=mask,
        scale=spec.scale)
    return out.transpose(1, 2), lse, None


def kernel_backward(d_out, q, k, v, out, lse, spec: Spec, saved) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv) of the kernel's softmax normalised by `lse` (B, H, Tq), with D = rowsum(d_out * out)."""
    if uses_flash_attention_2(q):
        fa = _fa_layout(q, k, spec)
        squeeze = (lambda x: x[0]) if fa["cum"] is not None else (lambda x: x)
        if saved is None:  # a ring pair: no forward state kept (dropout is 0, so the RNG state is never read)
            saved = (lse.float(), torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64))
        raw_lse, rng, unused = saved
        lse = lse.to(raw_lse.dtype)
        if spec.bounds is not None and raw_lse.dim() == 3:  # back to FA's padded layout
            padded = torch.zeros_like(raw_lse)
            for d, (s, e) in enumerate(spec.bounds):
                padded[d, :, : e - s] = lse[0, :, s:e]
            lse = padded
        elif spec.bounds is not None:
            lse = lse[0]
        causal, window = _fa_window(spec, q.shape[1], k.shape[1])
        grads = fa2_ops()[1](
            squeeze(d_out).contiguous(), squeeze(q), squeeze(k), squeeze(v), squeeze(out), lse.contiguous(),
            fa["cum"], fa["cum"], fa["max_q"], fa["max_k"], 0.0, causal, rng, unused, scale=spec.scale, **window)
        return tuple(g.view(x.shape) for g, x in zip(grads, (q, k, v), strict=True))
    mask = _cpu_mask(spec, q.shape[1], k.shape[1], q.dtype)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        d_out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
        lse.to(q.dtype) if q.dtype == torch.float64 else lse.float(), 0.0, spec.causal and mask is None,
        attn_mask=mask, scale=spec.scale)
    return tuple(g.transpose(1, 2) for g in grads)


# ------------------------------------------------------------------------------------------ pinned tokens
def _pinned_segments(spec: Spec, t_q: int, t_k: int):
    """(query slice, first query's position in its document, key slice of the pinned keys) per document."""
    offset = t_k - t_q  # queries are the last positions
    for s, e in spec.bounds or ((0, t_k),):
        q_lo = max(s, offset)
        first = q_lo - s
        if e > q_lo and e - s - 1 >= spec.window:  # some query of the document has passed its first key
            yield slice(q_lo - offset, e - offset), first, slice(s, s + min(spec.n_pinned, e - s))


def _pinned_scores(q, k, spec: Spec, first: int) -> torch.Tensor:
    """(B, H, n, P) scores of n queries (document positions first, first+1, ...) against P pinned keys, -inf where the
    key is still inside the query's window (the main part has it)."""
    g = q.shape[2] // k.shape[2]
    scores = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(g, dim=2)) * spec.scale
    i = torch.arange(first, first + q.shape[1], device=q.device)[:, None]
    j = torch.arange(k.shape[1], device=q.device)[None, :]
    return scores.masked_fill(i - j < spec.window, float("-inf"))


def pinned_forward(q, k, v, spec: Spec, acc: torch.dtype):
    """The pinned keys' part: (out (B, Tq, H, d), lse (B, H, Tq)), zero and -inf where a query has none."""
    b, t_q, h, _ = q.shape
    out = torch.zeros(b, t_q, h, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((b, h, t_q), float("-inf"), dtype=acc, device=q.device)
    g = h // k.shape[2]
    for qs, first, ks in _pinned_segments(spec, t_q, k.shape[1]):
        scores = _pinned_scores(q[:, qs].to(acc), k[:, ks].to(acc), spec, first)
        part = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - part.masked_fill(torch.isinf(part), 0)[..., None])
        out[:, qs] = torch.einsum("bhij,bjhd->bihd", probs, v[:, ks].to(acc).repeat_interleave(g, dim=2))
        lse[:, :, qs] = part
    return out, lse


def pinned_backward(q, k, v, d_out, out, lse, delta, spec: Spec):
    """Gradients of the pinned part given the merged lse and delta = rowsum(d_out * out) - d_lse: with
    P = exp(scores - lse), dV = P^T dO, dS = P (dO V^T - delta), dQ = dS K, dK = dS^T Q (written out, so
    torch.compile traces it)."""
    grads = [torch.zeros_like(x, dtype=lse.dtype) for x in (q, k, v)]
    g = q.shape[2] // k.shape[2]
    for qs, first, ks in _pinned_segments(spec, q.shape[1], k.shape[1]):
        qp, kp, vp, dop = (x.to(lse.dtype) for x in (q[:, qs], k[:, ks], v[:, ks], d_out[:, qs]))
        k_rep, v_rep = kp.repeat_interleave(g, dim=2), vp.repeat_interleave(g, dim=2)
        probs = torch.exp(_pinned_scores(qp, kp, spec, first) - lse[:, :, qs, None])
        ds = probs * (torch.einsum("bihd,bjhd->bhij", dop, v_rep) - delta[:, :, qs, None])
        per_kv = lambda x: x.unflatten(2, (k.shape[2], g)).sum(3)  # noqa: E731  query heads -> their k/v head
        grads[0][:, qs] += torch.einsum("bhij,bjhd->bihd", ds, k_rep) * spec.scale
        grads[1][:, ks] += per_kv(torch.einsum("bhij,bihd->bjhd", ds, qp)) * spec.scale
        grads[2][:, ks] += per_kv(torch.einsum("bhij,bihd->bjhd", probs, dop))
    return grads


# ---------------------------------------------------------------------------------------------- the op
def _merge(out, lse, o, lse_b):
    """Two normalised parts over disjoint keys -> one: out (B, T, H, d), lse (B, H, T)."""
    new = torch.logaddexp(lse, lse_b)
    weight = lambda x: torch.exp(x - new).transpose(1, 2)[..., None]  # noqa: E731
    return out * weight(lse) + o * weight(lse_b), new


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, spec: Spec):
        acc = compute_dtype(q.dtype)
        o, lse, saved = kernel_forward(q, k, v, spec)
        out, lse = o.to(acc), lse.to(acc)
        pinned = spec.window is not None and spec.n_pinned > 0
        if pinned:
            out, lse = _merge(out, lse, *pinned_forward(q, k, v, spec, acc))
        if sink is not None:
            with_sink = torch.logaddexp(lse, sink.to(acc)[None, :, None])  # the sink takes mass, gives no value
            out, lse = out * torch.exp(lse - with_sink).transpose(1, 2)[..., None], with_sink
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, sink, out, lse)
        ctx.spec, ctx.saved, ctx.pinned = spec, saved, pinned
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, sink, out, lse = ctx.saved_tensors
        spec = ctx.spec
        d_out = torch.zeros_like(out) if d_out is None else d_out.to(q.dtype)
        dq, dk, dv = (g.to(lse.dtype) for g in kernel_backward(d_out, q, k, v, out, lse, spec, ctx.saved))
        if d_lse is not None:  # P * d_lse on the scores: one more backward with dP = 0 and D = -d_lse
            unit = torch.zeros_like(q)
            unit[..., 0] = 1
            fake_out = torch.zeros_like(out)
            fake_out[..., 0] = -d_lse.transpose(1, 2).to(out.dtype)
            eq, ek, _ = kernel_backward(unit, q, k, torch.zeros_like(v), fake_out, lse, spec, ctx.saved)
            dq, dk = dq + eq.to(lse.dtype), dk + ek.to(lse.dtype)
        delta = (d_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1).transpose(1, 2)  # (B, H, Tq)
        if d_lse is not None:
            delta = delta - d_lse.to(lse.dtype)
        if ctx.pinned:
            pq, pk, pv = pinned_backward(q, k, v, d_out, out, lse, delta, spec)
            dq, dk, dv = dq + pq, dk + pk, dv + pv
        d_sink = None
        if sink is not None and ctx.needs_input_grad[3]:
            d_sink = -(torch.exp(sink.to(lse.dtype)[None, :, None] - lse) * delta).sum(dim=(0, 2)).to(sink.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_sink, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    window: int | None = None, sink: torch.Tensor | None = None, scale: float | None = None,
                    n_pinned: int = 0, bounds: list[tuple[int, int]] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention` (checked inputs) on the vendor kernel: (out (B, Tq, H, d), lse (B, H, Tq) in fp32/fp64).
    `bounds`: the packed documents' (start, end), batch 1."""
    spec = Spec(causal, window, q.shape[-1] ** -0.5 if scale is None else scale, n_pinned if window else 0,
                tuple(bounds) if bounds else None)
    return FlashAttention.apply(q, k, v, sink, spec)


# ------------------------------------------------------------------------------------- ring attention's pairs
# One (query segment, key segment) pair on the grouped layout q (B, Hkv, G, Tq, d), k/v (B, Hkv, 1, Tk, d), as
# parallel/ring.py's other pair kernels: views of the same tensors as (B, T, H, d), head h = kv * G + g.
def _pair_spec(q, k, scale: float, layout) -> tuple[Spec, int]:
    """The pair's Spec, and how many keys can be seen at all (keys past the last query are cut: FA cannot
    express them)."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    if layout.causal:
        t_k = max(0, min(t_k, layout.q_start + t_q - layout.k_start))
    return Spec(layout.causal, None, scale, 0, None, layout.q_start, layout.k_start), t_k


def _bthd(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1, 2).transpose(1, 2)


def pair_forward(q, k, v, scale: float, layout):
    spec, t_k = _pair_spec(q, k, scale, layout)
    b, h_kv, g, t_q, _ = q.shape
    out, lse, _ = kernel_forward(_bthd(q), _bthd(k[..., :t_k, :]), _bthd(v[..., :t_k, :]), spec)
    return out.transpose(1, 2).reshape(b, h_kv, g, t_q, -1), lse.reshape(b, h_kv, g, t_q)


def pair_backward(q, k, v, d_out, delta, lse, scale: float, layout, out=None):
    """dq, dk, dv of one pair given the merged lse and delta = rowsum(d_out * out) - d_lse.  With the merged `out`
    (and no lse gradient) one kernel backward; without, two: dP with D = 0, then -P * delta (v = 0, dout = e_0,
    out = delta e_0)."""
    spec, t_k = _pair_spec(q, k, scale, layout)
    b, h_kv, g, t_q, d = q.shape
    qb, kb, vb, dob = _bthd(q), _bthd(k[..., :t_k, :]), _bthd(v[..., :t_k, :]), _bthd(d_out.to(q.dtype))
    lse_b = lse.reshape(b, h_kv * g, t_q)
    if t_k == 0:
        return torch.zeros_like(q, dtype=lse.dtype), torch.zeros_like(k, dtype=lse.dtype), \
            torch.zeros_like(v, dtype=lse.dtype)
    if out is not None:
        dq, dk, dv = kernel_backward(dob, qb, kb, vb, _bthd(out.to(q.dtype)), lse_b, spec, None)
    else:
        dq, dk, dv = kernel_backward(dob, qb, kb, vb, torch.zeros_like(dob), lse_b, spec, None)
        unit = torch.zeros_like(qb)
        unit[..., 0] = 1
        fake_out = torch.zeros_like(dob)
        fake_out[..., 0] = delta.reshape(b, h_kv * g, t_q).transpose(1, 2).to(q.dtype)
        eq, ek, _ = kernel_backward(unit, qb, kb, torch.zeros_like(vb), fake_out, lse_b, spec, None)
        dq, dk = dq.to(lse.dtype) + eq.to(lse.dtype), dk.to(lse.dtype) + ek.to(lse.dtype)
    pad = lambda x: torch.nn.functional.pad(x.to(lse.dtype), (0, 0, 0, 0, 0, k.shape[-2] - t_k))  # noqa: E731
    regroup = lambda x: pad(x).transpose(1, 2)[:, :, None]  # noqa: E731  (B, Tk, Hkv, d) -> (B, Hkv, 1, Tk, d)
    return dq.to(lse.dtype).transpose(1, 2).reshape(b, h_kv, g, t_q, d), regroup(dk), regroup(dv)


# ------------------------------------------------------------------------------------------------ the probe
_PROBED: dict[str, str | None] = {}


def flash_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the flash backend cannot take these inputs, or None.  The installed torch's ops are probed once per
    device (a small bf16 call with a sink, a window, pinned tokens, packed documents and grouped heads, forward and
    backward, against the float64 oracle): an op missing an argument or disagreeing is a reason, never a silent
    substitute."""
    if q.dtype != k.dtype or q.dtype != v.dtype:
        return f"q, k, v have different dtypes ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.device.type not in ("cpu", "cuda"):
        return f"no flash kernel for {q.device.type} tensors"
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention takes float16/bfloat16 CUDA tensors, not {q.dtype}"
    if q.is_cuda and (q.shape[-1] % 8 or q.shape[-1] > 256 or v.shape[-1] != q.shape[-1]):
        return f"FlashAttention takes head dims that are multiples of 8 up to 256, not {q.shape[-1]}"
    key = str(q.device)
    if key not in _PROBED:
        if torch.compiler.is_compiling():  # the probe runs eagerly (probe_flash before compiling), never traced
            return "the flash kernels were not probed before torch.compile traced this call"
        _PROBED[key] = _probe(q.device)
    return _PROBED[key]


def probe_flash(device: torch.device) -> str | None:
    """Probe the device's flash kernels now (the trainer calls it before compiling blocks); the reason they
    cannot be used, or None."""
    x = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.bfloat16)
    return flash_problem(x, x, x)


def _probe(device: torch.device) -> str | None:
    from hylo.kernels.attention.naive import naive_attention

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 96, h, 64, device=device, generator=gen) for h in (4, 2, 2))
    sink = torch.randn(4, device=device, generator=gen)
    bounds = [(0, 40), (40, 96)]

    def flash(q, k, v, sink):
        return flash_attention(q, k, v, window=24, sink=sink, n_pinned=2, bounds=bounds)

    def oracle(q, k, v, sink):
        parts = [naive_attention(q[:, s:e], k[:, s:e], v[:, s:e], window=24, sink=sink, n_pinned=2)
                 for s, e in bounds]
        return torch.cat([o for o, _ in parts], dim=1), torch.cat([lse for _, lse in parts], dim=-1)

    def run(fn, dtype, sink_dtype):
        inputs = [x.detach().to(d).requires_grad_() for x, d in zip((q, k, v, sink), [dtype] * 3 + [sink_dtype],
                                                                     strict=True)]
        out, lse = fn(*inputs)
        (out.float().square().sum() + lse.float().sum()).backward()
        return [out.detach(), lse.detach()] + [x.grad for x in inputs]

    try:
        got = run(flash, torch.bfloat16, torch.float32) + ring_pair_probe(q, k, v, torch.bfloat16)
    except Exception as err:  # noqa: BLE001 - an op or an argument this torch does not have
        return f"this torch's FlashAttention ops failed a probe call ({type(err).__name__}: {str(err)[:200]})"
    want = run(oracle, torch.float64, torch.float64) + ring_pair_probe(q, k, v, torch.float64, reference=True)
    names = ("out", "lse", "dq", "dk", "dv", "dsink", "ring out", "ring lse", "ring dq", "ring dk", "ring dv")
    for name, a, b in zip(names, got, want, strict=True):
        err = (a.double() - b.double()).abs().max().item() / max(b.abs().max().item(), 1e-6)
        if not err < 3e-2:
            return f"this torch's FlashAttention ops disagree with the oracle on a probe call ({name}: {err:.1e})"
    return None


def ring_pair_probe(q, k, v, dtype, reference: bool = False) -> list[torch.Tensor]:
    """A ring step's pair (queries 40-71 against keys 24-63: part diagonal) on the grouped layout: forward and
    backward through the flash pair kernels, or (reference) the blockwise ones."""
    from hylo.kernels.attention.chunk import Layout, block_backward, block_forward, grad_delta

    b, _, h, d = q.shape
    h_kv = k.shape[2]
    qg = q[:, 40:72].to(dtype).transpose(1, 2).reshape(b, h_kv, h // h_kv, 32, d)
    kg, vg = (x[:, 24:64].to(dtype).transpose(1, 2)[:, :, None] for x in (k, v))
    layout = Layout(32, 40, causal=True, q_start=40, k_start=24)
    forward, backward = (block_forward, block_backward) if reference else (pair_forward, pair_backward)
    out, lse = forward(qg, kg, vg, d**-0.5, layout)
    d_out = torch.ones_like(out)
    delta = grad_delta(d_out.float(), out.float(), None)
    grads = backward(qg, kg, vg, d_out, delta.to(lse.dtype), lse, d**-0.5, layout)
    return [out, lse, *grads]
