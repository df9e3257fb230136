"""Every op's chunk path against its float64 naive oracle (forward and input gradients), and its recurrent step
against the parallel forward.  Fresh random inputs every run.

Tolerances: float64 paths agree to ~1e-12 (gradcheck, plus relative error <= 1e-9 — loose enough for
near-zero gradients); float32 chunk paths are held to a
relative error ||fast - ref|| / ||ref|| <= 1e-5 against the float64 oracle.
"""

import pytest
import torch

from hylo.kernels.ops import (
    attention,
    attention_step,
    based_linear_attention,
    based_step,
    lightning_attention,
    lightning_step,
    rat_attention,
    rat_step,
    tnl_slopes,
)

F64 = torch.float64


def rand(*shape, dtype=F64, low=None):
    x = torch.randn(*shape, dtype=dtype) if low is None else torch.rand(*shape, dtype=dtype) * (1 - low) + low
    return x.requires_grad_()


def outputs_and_grads(fn, inputs, seed=0):
    """fn(*inputs) -> tensor or tuple; returns (outputs, grads of a random projection w.r.t. every input)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=F64)).sum() for o in outs)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    return [o.detach().double() for o in outs], [g.double() for g in grads]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_matches(fast, ref, inputs, tol, sums=None):
    """fast(*inputs) vs ref(*inputs in float64): outputs and gradients, relative error <= tol.  `sums`: {input index:
    the summed magnitude of the terms of that input's gradient} for a gradient that is a sum whose terms cancel,
    whose rounding then scales with its terms, not with itself: |error| <= tol * that, elementwise."""
    ref_inputs = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
    out_f, grad_f = outputs_and_grads(fast, inputs)
    out_r, grad_r = outputs_and_grads(ref, ref_inputs)
    for i, (a, b) in enumerate(zip(out_f, out_r, strict=True)):
        assert rel_err(a, b) <= tol, f"output {i}: relative error {rel_err(a, b):.2e} > {tol}"
    for i, (a, b) in enumerate(zip(grad_f, grad_r, strict=True)):
        if sums and i in sums:
            assert ((a - b).abs() <= tol * sums[i]).all(), f"grad of input {i}: {a} vs {b}, terms {sums[i]}"
        elif b.abs().sum() > 0:
            assert rel_err(a, b) <= tol, f"grad of input {i}: relative error {rel_err(a, b):.2e} > {tol}"
        else:
            assert a.abs().max() <= tol


# ---------------------------------------------------------------------------------------------- attention
def attn(backend, **kw):
    def fn(q, k, v, *sink):
        return attention(q, k, v, sink=sink[0] if sink else None, return_lse=True, backend=backend, **kw)
    return fn


ATTN_CASES = {  # (T, H, Hkv, kwargs)
    "full": (37, 4, 4, {}),
    "gqa": (53, 4, 2, {}),
    "mqa-window": (70, 4, 1, {"window": 9}),
    "window-1": (33, 2, 2, {"window": 1}),
    "window>=T": (20, 2, 2, {"window": 64}),
    "pinned": (150, 2, 1, {"window": 16, "n_pinned": 4}),
    "multi-block": (300, 2, 2, {"window": 130}),
    "non-causal": (29, 2, 1, {"causal": False}),
}


@pytest.mark.parametrize("backend", ["chunk", "flash"])
@pytest.mark.parametrize("with_sink", [True, False], ids=["sink", "nosink"])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention_chunk_matches_oracle(case, with_sink, backend):
    """The blockwise path and the flash backend (torch's CPU flash kernel with sinks, pinned tokens and the lse's
    gradient composed around it) against the oracle: float64 exact, float32 to 1e-5, every gradient."""
    t, h, h_kv, kw = ATTN_CASES[case]
    inputs = [rand(2, t, h, 16), rand(2, t, h_kv, 16), rand(2, t, h_kv, 16)] + ([rand(h)] if with_sink else [])
    assert_matches(attn(backend, **kw), attn("naive", **kw), inputs, tol=1e-9)
    f32 = [x.detach().float().requires_grad_() for x in inputs]
    # 3e-5, not 1e-5: the sink's gradient is a sum over every query whose terms cancel, so its fp32 rounding
    # can reach 1.3e-5 relative (seen at HYLO_TEST_SEED=4048544112, non-causal); everything else stays < 1e-5
    assert_matches(attn(backend, **kw), attn("naive", **kw), f32, tol=3e-5 if with_sink else 1e-5)


def sink_gradient_terms(inputs, **kw) -> torch.Tensor:
    """Per head, the summed magnitude of the terms of the sink logit's gradient under outputs_and_grads' random
    projection: d/ds_h = -sum_q p_sink(q, h) * (dO_q . o_q - dlse_q), in float64 from the oracle."""
    q, k, v, sink = (x.detach().double() for x in inputs)
    o, lse = attention(q, k, v, sink=sink, return_lse=True, backend="naive", **kw)
    gen = torch.Generator().manual_seed(0)  # the projection outputs_and_grads draws: o's weights, then lse's
    d_o, d_lse = torch.randn(o.shape, generator=gen, dtype=F64), torch.randn(lse.shape, generator=gen, dtype=F64)
    p_sink = torch.exp(sink[None, :, None] - lse)  # (B, H, T)
    terms = p_sink * ((d_o * o).sum(-1).transpose(1, 2) - d_lse)
    return terms.abs().sum((0, 2))


@pytest.mark.parametrize("case", ["gqa", "pinned", "non-causal"])
def test_attention_flash_bf16_matches_oracle(case):
    """bf16 operands (the GPU's dtype; here the CPU kernel): outputs and gradients within bf16 rounding.  The
    sink's gradient is a sum over every query whose terms cancel (5e-2 relative to itself at
    HYLO_TEST_SEED=1962759746, non-causal): its rounding is held to the sum of its terms' magnitudes instead."""
    t, h, h_kv, kw = ATTN_CASES[case]
    inputs = [rand(1, t, h, 16, dtype=torch.bfloat16), rand(1, t, h_kv, 16, dtype=torch.bfloat16),
              rand(1, t, h_kv, 16, dtype=torch.bfloat16), rand(h, dtype=torch.float32)]
    assert_matches(attn("flash", **kw), attn("naive", **kw), inputs, tol=2e-2,
                   sums={3: sink_gradient_terms(inputs, **kw)})


def test_attention_flash_probe_and_refusals(monkeypatch):
    """The probe passes on this torch, a kernel that fails it is a reason (named, never a silent substitute), and
    what flash cannot take is a ValueError."""
    import importlib

    flash = importlib.import_module("hylo.kernels.attention.flash")  # (kernels.attention is also the op's name)
    assert flash._probe(torch.device("cpu")) is None
    monkeypatch.setattr(flash, "_PROBED", {})

    def missing_argument(*args, **kwargs):
        raise TypeError("_flash_attention_forward() got an unexpected keyword argument 'window_size_left'")
    monkeypatch.setattr(flash, "kernel_forward", missing_argument)
    q = rand(1, 8, 2, 8)
    with pytest.raises(ValueError, match="backend='flash' cannot take these inputs: .*failed a probe call.*"
                                         "window_size_left"):
        attention(q, q, q, backend="flash")
    assert attention(q, q, q, window=3, backend="auto") is not None  # auto on CPU: the blockwise path
    with pytest.raises(ValueError, match="different dtypes"):
        attention(q, q.float(), q, backend="flash")


def test_attention_gradcheck():
    q, k, v, sink = rand(1, 11, 2, 4), rand(1, 11, 1, 4), rand(1, 11, 1, 4), rand(2)
    assert torch.autograd.gradcheck(attn("chunk", window=4, n_pinned=1), (q, k, v, sink))
    assert torch.autograd.gradcheck(attn("chunk"), (q, k, v, sink))


@pytest.mark.parametrize("backend", ["chunk", "flash"])
def test_attention_fewer_queries_than_keys(backend):
    q, k, v, sink = rand(1, 5, 2, 8), rand(1, 40, 2, 8), rand(1, 40, 2, 8), rand(2)
    assert_matches(attn(backend, window=7), attn("naive", window=7), [q, k, v], tol=1e-9)
    assert_matches(attn(backend), attn("naive"), [q, k, v, sink], tol=1e-9)
    assert_matches(attn(backend, window=7, n_pinned=3), attn("naive", window=7, n_pinned=3), [q, k, v, sink],
                   tol=1e-9)


def test_attention_sdpa_fast_path_matches_oracle():
    q, k, v = rand(2, 45, 4, 8, dtype=torch.float32), rand(2, 45, 2, 8, dtype=torch.float32), rand(2, 45, 2, 8,
                                                                                                   dtype=torch.float32)
    fast = lambda q, k, v: attention(q, k, v)  # noqa: E731  (no sink, no window, no lse: SDPA)
    ref = lambda q, k, v: attention(q, k, v, backend="naive")  # noqa: E731
    assert_matches(fast, ref, [q, k, v], tol=1e-5)


def test_sink_takes_mass_and_learns():
    q, k, v = torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8), torch.ones(1, 4, 1, 8)
    out, lse = attention(q, k, v, sink=torch.tensor([0.0]), return_lse=True)
    # all logits are 0: query t splits its mass over t+1 keys and the sink -> output (t+1)/(t+2)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1 / 2, 2 / 3, 3 / 4, 4 / 5]))
    torch.testing.assert_close(lse[0, 0], torch.log(torch.tensor([2.0, 3, 4, 5])))


@pytest.mark.parametrize("kw", [{}, {"window": 5}, {"window": 6, "n_pinned": 2}], ids=["full", "window", "pinned"])
def test_attention_step_equals_parallel(kw):
    q, k, v, sink = torch.randn(2, 23, 4, 8, dtype=F64), torch.randn(2, 23, 2, 8, dtype=F64), \
        torch.randn(2, 23, 2, 8, dtype=F64), torch.randn(4, dtype=F64)
    full = attention(q, k, v, sink=sink, backend="naive", **kw)
    state, outs = None, []
    for t in range(23):
        o, state = attention_step(state, q[:, t], k[:, t], v[:, t], sink=sink, **kw)
        outs.append(o)
        if "window" in kw:  # the cache stays bounded
            assert state["k"].shape[1] <= kw["window"] and state["pinned_k"].shape[1] <= kw.get("n_pinned", 0)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=0, atol=1e-9)


def test_attention_rejects_bad_inputs():
    q, kv = torch.randn(1, 8, 3, 4), torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="not a multiple of 2 key/value heads"):
        attention(q, kv, kv)
    with pytest.raises(ValueError, match="window=0 needs causal=True and window >= 1"):
        attention(kv, kv, kv, window=0)
    with pytest.raises(ValueError, match=r"sink must have shape \(heads,\)"):
        attention(kv, kv, kv, sink=torch.zeros(3))
    with pytest.raises(ValueError, match="backend='fast' is not one of"):
        attention(kv, kv, kv, backend="fast")


# ---------------------------------------------------------------------------------------------- lightning
def light(backend):
    return lambda q, k, v, s: lightning_attention(q, k, v, s, backend=backend)


@pytest.mark.parametrize("t,decay", [(1, "tnl"), (37, "tnl"), (64, "zero"), (129, "steep"), (200, "mixed")])
def test_lightning_chunk_matches_oracle(t, decay):
    slopes = {"tnl": tnl_slopes(4, 0, 6), "zero": torch.zeros(4), "steep": torch.full((4,), 8.0),
              "mixed": torch.tensor([0.0, 1e-3, 0.5, 30.0])}[decay].double()
    inputs = [rand(2, t, 4, 8), rand(2, t, 4, 8), rand(2, t, 4, 12)]
    fn = lambda q, k, v: lightning_attention(q, k, v, slopes, backend="chunk")  # noqa: E731
    ref = lambda q, k, v: lightning_attention(q, k, v, slopes, backend="naive")  # noqa: E731
    assert_matches(fn, ref, inputs, tol=1e-9)
    assert_matches(fn, ref, [x.detach().float().requires_grad_() for x in inputs], tol=1e-5)


def test_lightning_gradcheck_including_decay():
    inputs = (rand(1, 70, 2, 3), rand(1, 70, 2, 3), rand(1, 70, 2, 2), rand(2, low=0.01))
    assert torch.autograd.gradcheck(light("chunk"), inputs)


def test_lightning_long_sequence_does_not_overflow():
    # exp(+s*j) at s=1, j=4096 overflows fp32; the chunked form only ever exponentiates -s*n.
    q, k, v = (torch.randn(1, 4096, 2, 4) for _ in range(3))
    out = lightning_attention(q, k, v, torch.tensor([1.0, 0.05]))
    assert torch.isfinite(out).all()


def test_lightning_step_equals_parallel():
    q, k, v, s = torch.randn(2, 40, 3, 4, dtype=F64), torch.randn(2, 40, 3, 4, dtype=F64), \
        torch.randn(2, 40, 3, 5, dtype=F64), tnl_slopes(3, 1, 4).double()
    full, state, outs = lightning_attention(q, k, v, s), None, []
    for t in range(40):
        o, state = lightning_step(state, q[:, t], k[:, t], v[:, t], s)
        outs.append(o)
    assert state.shape == (2, 3, 4, 5)  # O(1) state
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=0, atol=1e-11)


def test_tnl_slopes_schedule():
    first, last = tnl_slopes(8, 0, 12), tnl_slopes(8, 11, 12)
    torch.testing.assert_close(first, torch.tensor([2.0 ** -(i + 1) for i in range(8)]) * (1 + 1e-5))
    torch.testing.assert_close(last, first / (1 + 1e-5) * 1e-5)
    assert torch.allclose(tnl_slopes(6, 0, 2)[:4], torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]) * (1 + 1e-5))
    with pytest.raises(ValueError, match="decay slopes must be >= 0"):
        lightning_attention(*(torch.randn(1, 4, 2, 3) for _ in range(3)), torch.tensor([0.1, -0.1]))


# ---------------------------------------------------------------------------------------------- BASED
@pytest.mark.parametrize("t", [1, 17, 64, 150])
def test_based_chunk_matches_oracle(t):
    inputs = [rand(2, t, 3, 16), rand(2, t, 3, 16), rand(2, t, 3, 8)]
    fn = lambda q, k, v: based_linear_attention(q, k, v, backend="chunk")  # noqa: E731
    ref = lambda q, k, v: based_linear_attention(q, k, v, backend="naive")  # noqa: E731
    assert_matches(fn, ref, inputs, tol=1e-9)
    if t > 1:  # at T=1 the output is v/(1+eps): dq exists only through eps (~1e-6), below float32 resolution
        assert_matches(fn, ref, [x.detach().float().requires_grad_() for x in inputs], tol=1e-5)


def test_based_gradcheck():
    inputs = (rand(1, 70, 2, 4), rand(1, 70, 2, 4), rand(1, 70, 2, 3))
    assert torch.autograd.gradcheck(lambda q, k, v: based_linear_attention(q, k, v, backend="chunk"), inputs)


def test_based_normaliser_counts_exactly_in_low_precision():
    # q = 0 makes every kernel value 1: the output is the running mean of v, and the normaliser counts tokens.
    # In bf16 a running count stops being exact at 256; the float32 state keeps the mean exact.
    t = 1000
    q, k = torch.zeros(1, t, 1, 16, dtype=torch.bfloat16), torch.randn(1, t, 1, 16).bfloat16()
    v = torch.ones(1, t, 1, 4, dtype=torch.bfloat16)
    v[:, ::2] = 3
    out = based_linear_attention(q, k, v).float()
    expected = torch.cumsum(v.float(), 1) / torch.arange(1, t + 1)[None, :, None, None]
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=0)


def test_based_step_equals_parallel():
    q, k, v = torch.randn(2, 30, 2, 16, dtype=F64), torch.randn(2, 30, 2, 16, dtype=F64), \
        torch.randn(2, 30, 2, 6, dtype=F64)
    full, state, outs = based_linear_attention(q, k, v), None, []
    for t in range(30):
        o, state = based_step(state, q[:, t], k[:, t], v[:, t])
        outs.append(o)
    assert state[0].shape == (2, 2, 1 + 16 + 256, 6)  # O(1) state
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------- RAT
@pytest.mark.parametrize("t,chunk", [(1, 4), (16, 16), (64, 16), (67, 16), (33, 1), (20, 32), (130, 8)],
                         ids=["t1", "single-chunk", "even", "padded", "L1", "L>T", "many-chunks"])
@pytest.mark.parametrize("rope", [None, 3.0], ids=["plain", "rope"])
@pytest.mark.parametrize("backend", ["chunk", "flash"])
def test_rat_chunk_matches_oracle(t, chunk, rope, backend):
    """flash: the softmax over chunk summaries as one flash-attention call, the L in-chunk offsets as query heads."""
    inputs = [rand(2, t, 3, 8), rand(2, t, 3, 8), rand(2, t, 3, 8), rand(2, t, 3, 8, low=0.01)]
    fn = lambda q, k, v, g: rat_attention(q, k, v, g, chunk, rope_theta=rope, backend=backend)  # noqa: E731
    ref = lambda q, k, v, g: rat_attention(q, k, v, g, chunk, rope_theta=rope, backend="naive")  # noqa: E731
    assert_matches(fn, ref, inputs, tol=1e-9)
    assert_matches(fn, ref, [x.detach().float().requires_grad_() for x in inputs], tol=1e-5)


def test_rat_flash_continues_a_prefix_like_the_chunk_path():
    """A prefix of chunk summaries (how context parallelism continues a sequence): flash = chunk, every gradient."""
    from hylo.kernels.rat import scan_summaries

    q, k, v, g = rand(1, 24, 2, 8), rand(1, 24, 2, 8), rand(1, 24, 2, 8), rand(1, 24, 2, 8, low=0.01)
    pk, pv = (x.detach().requires_grad_() for x in scan_summaries(rand(1, 12, 2, 8), rand(1, 12, 2, 8),
                                                                   rand(1, 12, 2, 8, low=0.01), 4))

    def call(backend):
        return lambda q, k, v, g, pk, pv: rat_attention(q, k, v, g, 4, rope_theta=3.0, prefix=(pk, pv),
                                                        backend=backend)
    assert_matches(call("flash"), call("chunk"), [q, k, v, g, pk, pv], tol=1e-9)


def test_rat_first_chunk_has_no_nan():
    q, k, v = (torch.randn(1, 8, 2, 4, requires_grad=True) for _ in range(3))
    g = torch.full((1, 8, 2, 4), 0.9, requires_grad=True)
    out = rat_attention(q, k, v, g, 4)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v, g)) and torch.isfinite(out).all()


def test_rat_gradcheck():
    inputs = (rand(1, 21, 2, 3), rand(1, 21, 2, 3), rand(1, 21, 2, 3), rand(1, 21, 2, 3, low=0.05))
    assert torch.autograd.gradcheck(lambda q, k, v, g: rat_attention(q, k, v, g, 4, backend="chunk"), inputs)


def test_rat_rope_is_applied_after_the_scan():
    """The paper's order (the authors' code rotates `intra_k` after `ascan`): the scanned keys turn by their chunk.
    Rotating the raw keys before the scan is a different op, because the gate is per channel and RoPE mixes
    channel pairs; with a gate equal on both channels of every rotated pair the two orders must agree."""
    from hylo.kernels.rope import apply_rope, rope_table

    t, chunk, d, theta = 40, 8, 8, 3.0
    q, k, v = (torch.randn(1, t, 2, d, dtype=F64) for _ in range(3))
    cos, sin = rope_table(t // chunk, d, theta, F64, "cpu")
    by_chunk = torch.arange(t) // chunk

    def rotate_first(x):
        return apply_rope(x, cos[by_chunk][:, None], sin[by_chunk][:, None])

    def both_orders(g):
        after = rat_attention(q, k, v, g, chunk, rope_theta=theta, backend="naive")
        before = rat_attention(rotate_first(q), rotate_first(k), v, g, chunk, backend="naive")
        return after, before

    after, before = both_orders(torch.rand(1, t, 2, d, dtype=F64) * 0.9 + 0.05)
    assert rel_err(before, after) > 1e-2
    paired = (torch.rand(1, t, 2, d // 2, dtype=F64) * 0.9 + 0.05).repeat(1, 1, 1, 2)
    after, before = both_orders(paired)
    torch.testing.assert_close(before, after, rtol=0, atol=1e-12)
    # Only chunk differences matter: a query's own scanned key is never rotated against it.
    assert not torch.equal(after, rat_attention(q, k, v, paired, chunk, backend="naive"))


@pytest.mark.parametrize("rope", [None, 3.0], ids=["plain", "rope"])
def test_rat_step_equals_parallel(rope):
    t, chunk = 37, 8
    q, k, v = (torch.randn(2, t, 2, 4, dtype=F64) for _ in range(3))
    g = torch.rand(2, t, 2, 4, dtype=F64)
    full, state, outs = rat_attention(q, k, v, g, chunk, rope_theta=rope), None, []
    for i in range(t):
        o, state = rat_step(state, q[:, i], k[:, i], v[:, i], g[:, i], chunk, rope_theta=rope)
        outs.append(o)
    assert state["k_sum"].shape[1] == t // chunk  # O(T/L) state
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("op", ["attention", "lightning", "based", "rat"])
def test_bf16_inputs_run_with_fp32_accumulation(op):
    t = 96
    q, k, v, g = torch.randn(1, t, 2, 16), torch.randn(1, t, 2, 16), torch.randn(1, t, 2, 16), torch.rand(1, t, 2, 16)
    calls = {
        "attention": lambda q, k, v, g: attention(q, k, v, window=40, sink=torch.zeros(2), backend="chunk"),
        "lightning": lambda q, k, v, g: lightning_attention(q / 4, k / 4, v, torch.tensor([0.1, 0.0])),
        "based": lambda q, k, v, g: based_linear_attention(q, k, v),
        "rat": lambda q, k, v, g: rat_attention(q, k, v, g, 16),
    }
    ref = calls[op](q.double(), k.double(), v.double(), g.double())
    low = calls[op](q.bfloat16(), k.bfloat16(), v.bfloat16(), g.bfloat16())
    assert low.dtype == torch.bfloat16
    assert rel_err(low.double(), ref) < 2e-2


# ---------------------------------------------------------------------------------------------- state passing
def test_lightning_state_passing_matches_oracle_and_chains():
    t, slopes = 150, torch.tensor([0.0, 0.05, 0.7]).double()
    q, k, v, s0 = rand(2, t, 3, 4), rand(2, t, 3, 4), rand(2, t, 3, 5), rand(2, 3, 4, 5)

    def run(backend):
        return lambda q, k, v, s0: lightning_attention(q, k, v, slopes, initial_state=s0, output_final_state=True,
                                                       backend=backend)
    assert_matches(run("chunk"), run("naive"), [q, k, v, s0], tol=1e-9)
    # two segments with the state handed over == one pass; also across the chunk path's internal segments
    whole, final = lightning_attention(q, k, v, slopes, output_final_state=True)
    a, mid = lightning_attention(q[:, :61], k[:, :61], v[:, :61], slopes, output_final_state=True)
    b, end = lightning_attention(q[:, 61:], k[:, 61:], v[:, 61:], slopes, initial_state=mid, output_final_state=True)
    torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=0, atol=1e-10)
    torch.testing.assert_close(end, final, rtol=0, atol=1e-10)
    from hylo.kernels.lightning.chunk import chunk_lightning_attention

    seg, seg_final = chunk_lightning_attention(q, k, v, slopes, block=8, segment=40)
    torch.testing.assert_close(seg, whole, rtol=0, atol=1e-10)
    torch.testing.assert_close(seg_final, final, rtol=0, atol=1e-10)


def test_based_state_passing_matches_oracle_and_chains():
    t = 140
    q, k, v = rand(2, t, 2, 4), rand(2, t, 2, 4), rand(2, t, 2, 3)
    s0, z0 = rand(2, 2, 21, 3), (torch.rand(2, 2, 21, dtype=F64) + 1).requires_grad_()

    def run(backend):
        return lambda q, k, v, s0, z0: based_linear_attention(q, k, v, initial_state=(s0, z0),
                                                              output_final_state=True, backend=backend)

    def flat(fn):
        return lambda *x: (lambda out: (out[0], *out[1]))(fn(*x))
    assert_matches(flat(run("chunk")), flat(run("naive")), [q, k, v, s0, z0], tol=1e-9)
    whole, (s_end, z_end) = based_linear_attention(q, k, v, output_final_state=True)
    a, mid = based_linear_attention(q[:, :77], k[:, :77], v[:, :77], output_final_state=True)
    b, (s2, z2) = based_linear_attention(q[:, 77:], k[:, 77:], v[:, 77:], initial_state=mid, output_final_state=True)
    torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=0, atol=1e-10)
    torch.testing.assert_close(z2, z_end, rtol=0, atol=1e-10)  # padding never leaks into the normaliser
    torch.testing.assert_close(z_end[..., 0], torch.full_like(z_end[..., 0], t))
    from hylo.kernels.based.chunk import chunk_based_linear_attention

    seg, _ = chunk_based_linear_attention(q, k, v, block=16, segment=48)
    torch.testing.assert_close(seg, whole, rtol=0, atol=1e-10)


def test_a_named_backend_runs_that_backend_or_refuses():
    """kernels/dispatch.py: `chunk` means the chunk path (never SDPA), `sdpa` is explicit and plain-only, and a
    backend an op does not offer is refused by name."""
    from hylo.kernels.attention import chunk_attention

    q, k, v = (torch.randn(1, 24, 2, 8, dtype=F64) for _ in range(3))
    out, _ = chunk_attention(q, k, v, causal=True, window=None, sink=None, scale=None, n_pinned=0)
    assert torch.equal(attention(q, k, v, backend="chunk"), out)  # plain attention, yet the chunk path itself
    ref = attention(q, k, v, backend="naive")
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attention(q, k, v, window=5, backend="sdpa"),
                               attention(q, k, v, window=5, backend="naive"), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="backend='sdpa' takes plain attention only"):
        attention(q, k, v, sink=torch.zeros(2, dtype=F64), backend="sdpa")
    with pytest.raises(ValueError, match=r"backend='sdpa' is not one of \['auto', 'naive', 'chunk', 'triton'\]"):
        lightning_attention(q, k, v, torch.full((2,), 0.1, dtype=F64), backend="sdpa")


def test_the_benchmarks_flex_form_of_rat_is_rat():
    """bench/references.py's FlexAttention form of RAT (what the benchmark measures ours against) computes RAT:
    its forward equals the oracle (FlexAttention has no backward on the CPU)."""
    from bench.references import rat_flex

    q, k, v = (torch.randn(1, 32, 2, 8, dtype=torch.float32) for _ in range(3))
    gate = torch.rand(1, 32, 2, 8) * 0.9 + 0.05
    want = rat_attention(*(x.double() for x in (q, k, v, gate)), 4, rope_theta=3.0, backend="naive")
    torch.testing.assert_close(rat_flex(q, k, v, gate, 4, rope_theta=3.0).double(), want, rtol=1e-5, atol=1e-5)


def test_attention_flash_compiles_without_graph_breaks():
    """`torch.compile(fullgraph=True)` traces the flash backend with sinks, a window, pinned tokens and the lse
    (the trainer compiles blocks so; on a GPU `auto` picks this backend) and equals eager, gradients included."""
    def fn(q, k, v, sink):
        out, lse = attention(q, k, v, sink=sink, window=5, n_pinned=2, return_lse=True, backend="flash")
        return (out * out).sum() + lse.sum()

    inputs = [rand(1, 24, 4, 8, dtype=torch.float32), rand(1, 24, 2, 8, dtype=torch.float32),
              rand(1, 24, 2, 8, dtype=torch.float32), rand(4, dtype=torch.float32)]
    eager = torch.autograd.grad(fn(*inputs), inputs)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(torch.autograd.grad(compiled(*inputs), inputs), eager, strict=True):
        torch.testing.assert_close(a, b)
