"""The CUDA path of attention's flash backend — its calls to FlashAttention-2 (varlen packing, bottom-right causal
alignment, windows, the local mode of ring pairs, GQA, the lse layouts) — checked on the CPU against a float64
stand-in that computes what FA2's documented semantics say.  The GPU's probe (flash.py) then checks the real
kernels against the oracle on first use; this test keeps the plumbing honest between leases."""

import importlib

import pytest
import torch

from hylo.kernels.ops import attention

flash = importlib.import_module("hylo.kernels.attention.flash")  # (kernels.attention is also the op's name)


def _segments(q, k, cum_q, cum_k):
    """(query rows, key rows) of every sequence: the batch, or the packed documents."""
    if cum_q is None:
        return [((b, slice(None)), (b, slice(None))) for b in range(q.shape[0])]
    bounds_q, bounds_k = cum_q.tolist(), cum_k.tolist()
    return [((slice(a, b_),), (slice(c, d),)) for a, b_, c, d in
            zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:], strict=True)]


def _mask(t_q, t_k, causal, left, right):
    i = torch.arange(t_q)[:, None] + (t_k - t_q)  # bottom-right alignment
    j = torch.arange(t_k)[None, :]
    seen = torch.ones(t_q, t_k, dtype=torch.bool)
    if causal:
        right = 0
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    return seen


def _scores(qs, ks, scale, seen):
    g = qs.shape[1] // ks.shape[1]
    s = torch.einsum("ihd,jhd->hij", qs.double(), ks.double().repeat_interleave(g, dim=1)) * scale
    return s.masked_fill(~seen, float("-inf"))


def fake_forward(q, k, v, cum_q, cum_k, max_q, max_k, dropout, causal, debug, *, scale, window_size_left,
                 window_size_right, **_):
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32) if cum_q is None else \
        torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32)  # (B, H, Tq), or FA >= 2.5's varlen (H, total)
    for qi, ki in _segments(q, k, cum_q, cum_k):
        qs, ks, vs = q[qi], k[ki], v[ki]
        s = _scores(qs, ks, scale, _mask(qs.shape[0], ks.shape[0], causal, window_size_left, window_size_right))
        part = torch.logsumexp(s, -1)
        g = qs.shape[1] // ks.shape[1]
        out[qi] = torch.einsum("hij,jhd->ihd", torch.exp(s - part[..., None]),
                               vs.double().repeat_interleave(g, dim=1)).to(q.dtype)
        if cum_q is None:
            lse[qi[0]] = part.float()
        else:
            lse[:, qi[0]] = part.float()
    return out, lse, torch.zeros(()), torch.zeros(()), torch.empty(0)


def fake_backward(d_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout, causal, rng, unused, *, scale,
                  window_size_left, window_size_right):
    dq, dk, dv = (torch.zeros_like(x, dtype=torch.float64) for x in (q, k, v))
    for qi, ki in _segments(q, k, cum_q, cum_k):
        qs, ks, vs, dos = q[qi].double(), k[ki].double(), v[ki].double(), d_out[qi].double()
        g = qs.shape[1] // ks.shape[1]
        s = _scores(qs, ks, scale, _mask(qs.shape[0], ks.shape[0], causal, window_size_left, window_size_right))
        part = (lse[qi[0]] if cum_q is None else lse[:, qi[0]]).double()
        p = torch.exp(s - part[..., None])
        delta = (dos * out[qi].double()).sum(-1).transpose(0, 1)  # (H, Tq)
        dp = torch.einsum("ihd,jhd->hij", dos, vs.repeat_interleave(g, dim=1))
        ds = p * (dp - delta[..., None])
        dq[qi] = torch.einsum("hij,jhd->ihd", ds, ks.repeat_interleave(g, dim=1)) * scale
        dk[ki] = torch.einsum("hij,ihd->jhd", ds, qs).unflatten(1, (ks.shape[1], g)).sum(2) * scale
        dv[ki] = torch.einsum("hij,ihd->jhd", p, dos).unflatten(1, (ks.shape[1], g)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@pytest.fixture
def fa2(monkeypatch):
    """The CUDA branch taken on CPU tensors, FA2's ops replaced by the stand-in; yields the calls made."""
    calls = []

    def counted(op):
        return lambda *args, **kwargs: calls.append(op.__name__) or op(*args, **kwargs)
    monkeypatch.setattr(flash, "uses_flash_attention_2", lambda q: True)
    monkeypatch.setattr(flash, "fa2_ops", lambda: (counted(fake_forward), counted(fake_backward)))
    monkeypatch.setattr(flash, "_PROBED", {})
    yield calls


def run(backend, q, k, v, sink, **kw):
    inputs = [x.detach().clone().requires_grad_() for x in (q, k, v, sink)]
    out, lse = attention(*inputs[:3], sink=inputs[3], return_lse=True, backend=backend, **kw)
    gen = torch.Generator().manual_seed(0)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum() + \
        (lse * torch.randn(lse.shape, generator=gen, dtype=lse.dtype)).sum()
    loss.backward()
    return [out.detach(), lse.detach(), *(x.grad for x in inputs)]


@pytest.mark.parametrize("case", [{}, {"window": 7}, {"window": 7, "n_pinned": 3}, {"causal": False},
                                  {"tq": 9}, {"docs": [0, 5, 6, 30, 47]}, {"docs": [0, 20, 47], "window": 6,
                                                                             "n_pinned": 2}],
                         ids=["causal", "window", "pinned", "non-causal", "fewer-queries", "documents",
                              "documents-window-pinned"])
def test_the_fa2_calls_compose_to_the_oracle(fa2, case):
    case = dict(case)
    t_q, docs = case.pop("tq", 47), case.pop("docs", None)
    batch = 1 if docs else 2
    q = torch.randn(batch, t_q, 4, 8, dtype=torch.float64)
    k, v = (torch.randn(batch, 47, 2, 8, dtype=torch.float64) for _ in range(2))
    sink = torch.randn(4, dtype=torch.float64)
    kw = {**case, **({"cu_seqlens": torch.tensor(docs)} if docs else {})}
    got, want = run("flash", q, k, v, sink, **kw), run("naive", q, k, v, sink, **kw)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dsink"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    assert {"fake_forward", "fake_backward"} <= set(fa2)  # the FA2 branch ran


def test_ring_pairs_and_the_probe_on_the_fa2_calls(fa2):
    """The local mode a ring pair needs when its queries end after its keys, with and without an lse gradient;
    and the probe itself passes against the stand-in."""
    q = torch.randn(1, 96, 4, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 96, 2, 8, dtype=torch.float64) for _ in range(2))
    got = flash.ring_pair_probe(q, k, v, torch.float64)
    want = flash.ring_pair_probe(q, k, v, torch.float64, reference=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-6)
    assert flash._probe(torch.device("cpu")) is None
    assert fa2.count("fake_backward") >= 3  # the pair's two backward calls (lse gradient) and the probe's
