"""The Triton RAT kernels (kernels/rat/triton.py) against the float64 oracle: outputs and the gradients of q, k, v,
gate (and of the prefix summaries, against the chunk path, since the oracle takes no prefix), with and without
RoPE after the scan (ROPE = 3.0: a small theta turns every channel pair visibly from one chunk to the next).

Without a GPU the kernels run on the Triton CPU interpreter (conftest sets TRITON_INTERPRET=1), which is slow:
shapes stay tiny.  Every output and internal buffer is NaN-poisoned before the kernels run (HYLO_POISON=1), so
an element a kernel forgets to write shows up as a NaN.  Tolerances, as ||fast - ref|| / ||ref||: fp32 inputs
1e-5; bf16/fp16 inputs 5e-3 for outputs and 1e-2 for gradients.
"""

import pytest
import torch

from hylo.kernels.ops import rat_attention
from hylo.kernels.triton_support import triton_usable

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_usable(torch.empty(0, device=DEVICE)),
                                reason="needs a GPU or TRITON_INTERPRET=1")
F64 = torch.float64
ROPE = 3.0


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("HYLO_POISON", "1")


def make_inputs(b, t, h, d, dtype=torch.float32):
    """q, k, v, gate (B, T, H, d); gates in (0.02, 0.98), like a trained forget gate."""
    q, k, v = (torch.randn(b, t, h, d, device=DEVICE).to(dtype) for _ in range(3))
    gate = (torch.rand(b, t, h, d, device=DEVICE) * 0.96 + 0.02).to(dtype)
    return [q, k, v, gate]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def outputs_and_grads(fn, inputs, weight):
    """fn(*inputs) and the gradients of sum(fn(*inputs) * weight) w.r.t. every input (detached leaves, which
    keep the inputs' strides)."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad((out.double() * weight).sum(), leaves, allow_unused=True, materialize_grads=True)
    return out.detach(), grads


def check(fast, ref, inputs, ref_inputs, out_tol, grad_tol, names=("q", "k", "v", "gate")):
    """fast(*inputs) vs ref(*ref_inputs): outputs and gradients, relative errors within the tolerances."""
    probe = fast(*inputs)
    weight = torch.randn(probe.shape, dtype=F64, device=DEVICE)
    out_f, grad_f = outputs_and_grads(fast, inputs, weight)
    out_r, grad_r = outputs_and_grads(ref, ref_inputs, weight)
    assert out_f.dtype == inputs[0].dtype and out_f.shape == out_r.shape
    assert torch.isfinite(out_f).all(), "output has NaN/inf: an element was not written"
    assert rel_err(out_f, out_r) <= out_tol, f"output: relative error {rel_err(out_f, out_r):.2e} > {out_tol}"
    grad_scale = max(g.double().norm() for g in grad_r)
    for name, a, b in zip(names, grad_f, grad_r, strict=True):
        assert a.dtype == dict(zip(names, inputs, strict=True))[name].dtype
        assert torch.isfinite(a).all(), f"grad of {name} has NaN/inf: an element was not written"
        assert a.shape == b.shape
        if b.numel() == 0:  # an empty prefix
            continue
        if b.abs().max() > 0:
            assert rel_err(a, b) <= grad_tol, f"grad of {name}: relative error {rel_err(a, b):.2e} > {grad_tol}"
        else:  # a single chunk: the softmax over one key has zero gradient w.r.t. q and k.  16-bit outputs
            # leave a rounding residue, since delta = rowsum(dO * O) reads the rounded O (as flash attention does).
            assert a.double().norm() <= grad_tol * grad_scale, f"grad of {name} should be zero"


def triton_op(chunk, **kw):
    return lambda q, k, v, g: rat_attention(q, k, v, g, chunk, backend="triton", **kw)


def naive_op(chunk, **kw):
    return lambda q, k, v, g: rat_attention(q, k, v, g, chunk, backend="naive", **kw)


def check_vs_oracle(b, t, h, d, chunk, dtype=torch.float32, out_tol=1e-5, grad_tol=1e-5, **kw):
    inputs = make_inputs(b, t, h, d, dtype)
    check(triton_op(chunk, **kw), naive_op(chunk, **kw), inputs, [x.to(F64) for x in inputs], out_tol, grad_tol)


# ---------------------------------------------------------------------------------------------- vs the oracle
@pytest.mark.parametrize("b,t,h,d,chunk", [
    (1, 37, 2, 16, 4),   # partial last chunk, several query and key blocks
    (2, 20, 1, 32, 1),   # L = 1: every token is a chunk, its summary is (1 - g) * k
    (1, 24, 2, 16, 32),  # L > T: one partial chunk, no summaries at all
    (1, 16, 1, 16, 16),  # L = T: one full chunk
    (1, 48, 1, 16, 16),  # L = 16
    (1, 1, 1, 16, 4),    # a single token
    pytest.param(1, 40, 1, 64, 8, marks=pytest.mark.slow),  # d = 64 (the sweep covers 64 and 128 too)
    (1, 50, 1, 16, 24),  # L not a power of two: chunks padded to 32 rows inside the tiles
], ids=["partial", "L1", "L>T", "single-chunk", "L16", "t1", "d64", "L24"])
def test_fp32_matches_oracle(b, t, h, d, chunk):
    check_vs_oracle(b, t, h, d, chunk, rope_theta=ROPE)


@pytest.mark.parametrize("b,t,h,d,chunk", [(1, 37, 2, 16, 4), (1, 50, 1, 16, 24)], ids=["partial", "L24"])
def test_fp32_without_rope_matches_oracle(b, t, h, d, chunk):
    check_vs_oracle(b, t, h, d, chunk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_matches_oracle(dtype):
    check_vs_oracle(1, 37, 2, 32, 4, dtype, out_tol=5e-3, grad_tol=1e-2, rope_theta=ROPE)


def test_16bit_inputs_with_fp32_gate():
    """What the layer passes: bf16 q, k, v (tensor-core dots) and the fp32 gate; dgate comes back in fp32."""
    inputs = make_inputs(1, 37, 2, 32, torch.bfloat16)
    inputs[3] = inputs[3].float()
    check(triton_op(4, rope_theta=ROPE), naive_op(4, rope_theta=ROPE), inputs, [x.to(F64) for x in inputs],
          5e-3, 1e-2)


def test_refuses_what_it_cannot_run():
    q, k, v, gate = make_inputs(1, 8, 1, 16)
    with pytest.raises(ValueError, match="chunk_size <= 128"):
        rat_attention(q, k, v, gate, 256, backend="triton")
    with pytest.raises(ValueError, match="gate"):
        rat_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), gate.half(), 4, backend="triton")


def test_custom_scale_and_head_dim_not_a_power_of_two():
    check_vs_oracle(1, 21, 1, 24, 4, scale=0.3, rope_theta=ROPE)


def test_non_contiguous_inputs():
    b, t, h, d, chunk = 1, 29, 2, 16, 4
    # (B, H, T, d) storage seen as (B, T, H, d); v a slice of a wider projection (as RAT's fused z/v/g matmul
    # gives); the gate transposed along the head dim.
    q = torch.randn(b, h, t, d, device=DEVICE).transpose(1, 2)
    k = torch.randn(b, h, t, d, device=DEVICE).transpose(1, 2)
    v = torch.randn(b, t, h, 3 * d, device=DEVICE)[..., d:2 * d]
    gate = (torch.rand(b, t, d, h, device=DEVICE) * 0.9 + 0.05).transpose(2, 3)
    assert not any(x.is_contiguous() for x in (q, k, v, gate))
    inputs = [q, k, v, gate]
    check(triton_op(chunk, rope_theta=ROPE), naive_op(chunk, rope_theta=ROPE), inputs, [x.to(F64) for x in inputs],
          1e-5, 1e-5)


def test_non_contiguous_output_gradient():
    b, t, h, d, chunk = 1, 19, 2, 16, 4
    inputs = [x.requires_grad_() for x in make_inputs(b, t, h, d)]
    weight = torch.randn(b, h, t, d, device=DEVICE).transpose(1, 2)  # dO = weight, strided like (B, H, T, d)
    grads = {}
    for backend, xs in (("triton", inputs), ("naive", [x.detach().double().requires_grad_() for x in inputs])):
        out = rat_attention(*xs, chunk, backend=backend)
        grads[backend] = torch.autograd.grad((out * weight.to(out.dtype)).sum(), xs)
    for a, b_ in zip(grads["triton"], grads["naive"], strict=True):
        assert rel_err(a, b_) <= 1e-5


# ---------------------------------------------------------------------------------------------- prefix
@pytest.mark.parametrize("t,chunk,n_prefix", [(24, 4, 3), (13, 4, 2), (10, 16, 2), (12, 4, 0)],
                         ids=["whole-chunks", "partial", "one-partial-chunk", "empty-prefix"])
def test_prefix_matches_chunk_path(t, chunk, n_prefix):
    """The prefix summaries (context parallelism) against the float64 chunk path, gradients of the prefix
    included."""
    b, h, d = 2, 2, 16
    inputs = make_inputs(b, t, h, d) + [torch.randn(b, n_prefix, h, d, device=DEVICE) for _ in range(2)]

    def op(backend):
        return lambda q, k, v, g, pk, pv: rat_attention(q, k, v, g, chunk, prefix=(pk, pv), rope_theta=ROPE,
                                                        backend=backend)
    check(op("triton"), op("chunk"), inputs, [x.to(F64) for x in inputs], 1e-5, 1e-5,
          names=("q", "k", "v", "gate", "prefix_k", "prefix_v"))


def test_prefix_continues_the_sequence():
    """Attention over [first chunks | rest] equals the rest with the first chunks' summaries as its prefix."""
    from hylo.kernels.rat import scan_summaries

    b, t, h, d, chunk, split = 1, 28, 2, 16, 4, 12
    q, k, v, gate = make_inputs(b, t, h, d)
    whole = rat_attention(q, k, v, gate, chunk, rope_theta=ROPE, backend="triton")
    prefix = scan_summaries(k[:, :split], v[:, :split], gate[:, :split], chunk)
    rest = rat_attention(q[:, split:], k[:, split:], v[:, split:], gate[:, split:], chunk, prefix=prefix,
                         rope_theta=ROPE, backend="triton")
    assert rel_err(rest, whole[:, split:]) <= 1e-5


def test_prefix_without_grad():
    q, k, v, gate = (x.requires_grad_() for x in make_inputs(1, 12, 1, 16))
    prefix = (torch.randn(1, 2, 1, 16, device=DEVICE), torch.randn(1, 2, 1, 16, device=DEVICE))
    rat_attention(q, k, v, gate, 4, prefix=prefix, backend="triton").sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v, gate))


# ---------------------------------------------------------------------------------------------- dispatch
def test_auto_backend_picks_triton_only_on_cuda():
    inputs = make_inputs(1, 9, 1, 16)
    auto = rat_attention(*inputs, 4)
    expected = "triton" if DEVICE == "cuda" else "chunk"
    torch.testing.assert_close(auto, rat_attention(*inputs, 4, backend=expected), rtol=0, atol=0)
    with pytest.raises(ValueError, match="'triton'"):
        rat_attention(*inputs, 4, backend="nope")


# ---------------------------------------------------------------------------------------------- full sweep
@pytest.mark.slow
@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
@pytest.mark.parametrize("t", [1, 17, 64])
def test_sweep_fp32(t, chunk, d):
    check_vs_oracle(1, t, 2, d, chunk, rope_theta=ROPE)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("t,chunk,d", [(64, 16, 64), (70, 8, 128), (33, 1, 32), (50, 64, 16)])
def test_sweep_16bit(t, chunk, d, dtype):
    check_vs_oracle(1, t, 2, d, chunk, dtype, out_tol=5e-3, grad_tol=1e-2, rope_theta=ROPE)


@pytest.mark.slow
@pytest.mark.parametrize("t,chunk,n_prefix", [(64, 16, 5), (37, 4, 9), (40, 64, 3), (17, 1, 20)])
def test_sweep_prefix(t, chunk, n_prefix):
    b, h, d = 2, 2, 32
    inputs = make_inputs(b, t, h, d) + [torch.randn(b, n_prefix, h, d, device=DEVICE) for _ in range(2)]

    def op(backend):
        return lambda q, k, v, g, pk, pv: rat_attention(q, k, v, g, chunk, prefix=(pk, pv), rope_theta=ROPE,
                                                        backend=backend)
    check(op("triton"), op("chunk"), inputs, [x.to(F64) for x in inputs], 1e-5, 1e-5,
          names=("q", "k", "v", "gate", "prefix_k", "prefix_v"))
