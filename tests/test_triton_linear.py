"""The Triton backends of lightning attention and BASED against their float64 naive oracles: outputs, final states
and the gradients of every input (q, k, v, initial state), with a random projection of every output (final states
included) as the loss, so the final states' gradients flow in too.

Without a GPU the kernels run on Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1): slow, so the
shapes are tiny and the default suite keeps a representative few; `-m slow` runs the sweep.  Outputs are allocated
with torch.empty and filled with NaN first (HYLO_POISON=1), so an element a kernel never writes fails the test.

Tolerances (relative error ||fast - ref|| / ||ref|| against the float64 oracle fed the same rounded inputs):
float32 inputs 1e-5 everywhere; bfloat16 (and float16) inputs 5e-3 for outputs, 1e-2 for gradients (in bfloat16
the kernels land at about 1.5e-3 and 2.5e-3, as the chunk paths do: little more than rounding the result).
"""

from __future__ import annotations

import pytest
import torch

from hylo.kernels.ops import based_linear_attention, lightning_attention, tnl_slopes
from hylo.kernels.triton_support import triton_usable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-3, 1e-2), torch.float16: (5e-3, 1e-2)}  # (out, grad)

pytestmark = pytest.mark.skipif(not triton_usable(torch.empty(0, device=DEVICE)),
                                reason="needs triton with a GPU, or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("HYLO_POISON", "1")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def flatten(out) -> list[torch.Tensor]:
    """out, (out, state) or (out, (S, z)) -> a flat list of tensors."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for x in out for t in flatten(x)]


def outputs_and_grads(fn, inputs: list[torch.Tensor]):
    outs = flatten(fn(*inputs))
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(o.shape, generator=gen, dtype=F64).to(o.device) for o in outs]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights, strict=True))
    grads = torch.autograd.grad(loss, inputs)
    return [o.detach() for o in outs], grads


def assert_matches_oracle(fast, ref, inputs: list[torch.Tensor], dtype: torch.dtype) -> None:
    """fast(*inputs) against ref(*inputs in float64); q, k, v given in `dtype`, states in float32."""
    out_tol, grad_tol = TOL[dtype]
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    out_f, grad_f = outputs_and_grads(fast, inputs)
    out_r, grad_r = outputs_and_grads(ref, ref_inputs)
    for i, (a, b) in enumerate(zip(out_f, out_r, strict=True)):
        assert torch.isfinite(a).all(), f"output {i} has unwritten (NaN) or non-finite elements"
        assert rel_err(a, b) <= out_tol, f"output {i}: relative error {rel_err(a, b):.2e} > {out_tol}"
    for i, (a, b) in enumerate(zip(grad_f, grad_r, strict=True)):
        assert a.dtype == inputs[i].dtype and a.shape == inputs[i].shape
        assert torch.isfinite(a).all(), f"grad of input {i} has unwritten (NaN) or non-finite elements"
        assert rel_err(a, b) <= grad_tol, f"grad of input {i}: relative error {rel_err(a, b):.2e} > {grad_tol}"


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_()


# ---------------------------------------------------------------------------------------------- lightning
SLOPES = {"zero": [0.0, 0.0], "steep": [2.0, 2.0], "mixed": [0.0, 2.0], "tnl": tnl_slopes(2, 0, 4).tolist()}


def lightning_case(t: int, d: int, e: int, slopes: str, with_state: bool, dtype: torch.dtype) -> None:
    decay = torch.tensor(SLOPES[slopes], device=DEVICE)
    inputs = [randn(1, t, 2, d, dtype=dtype), randn(1, t, 2, d, dtype=dtype), randn(1, t, 2, e, dtype=dtype)]
    if with_state:
        inputs.append(randn(1, 2, d, e))

    def run(backend):
        def fn(q, k, v, s0=None):
            s = decay.to(q.dtype) if backend == "naive" else decay
            return lightning_attention(q, k, v, s, initial_state=s0, output_final_state=True, backend=backend)
        return fn
    assert_matches_oracle(run("triton"), run("naive"), inputs, dtype)


@pytest.mark.parametrize("t,d,e,slopes,with_state,dtype", [
    (37, 16, 32, "mixed", True, torch.float32),   # odd T over 3 blocks, 2 value tiles, decay 0 and 2, S0 in and out
    (5, 16, 16, "tnl", False, torch.float32),     # T shorter than a block
    (64, 32, 32, "steep", True, torch.float32),   # d = e = 32
    (37, 16, 16, "mixed", True, torch.bfloat16),
], ids=["odd-T-state", "short", "d32", "bf16"])
def test_lightning_matches_oracle(t, d, e, slopes, with_state, dtype):
    lightning_case(t, d, e, slopes, with_state, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("t,d,e,slopes,with_state", [
    (1, 16, 16, "mixed", True), (16, 16, 16, "zero", False), (64, 32, 32, "zero", True),
    (50, 32, 16, "tnl", True), (37, 16, 48, "zero", True), (64, 8, 16, "mixed", False),
])
def test_lightning_matches_oracle_sweep(t, d, e, slopes, with_state, dtype):
    lightning_case(t, d, e, slopes, with_state, dtype)


def test_lightning_state_passing_chains_and_matches_chunk():
    t, cut = 40, 23
    decay = torch.tensor([0.0, 0.3], device=DEVICE)
    q, k, v = (torch.randn(1, t, 2, 16, device=DEVICE) for _ in range(3))
    whole, final = lightning_attention(q, k, v, decay, output_final_state=True, backend="triton")
    a, mid = lightning_attention(q[:, :cut], k[:, :cut], v[:, :cut], decay, output_final_state=True,
                                 backend="triton")
    b, end = lightning_attention(q[:, cut:], k[:, cut:], v[:, cut:], decay, initial_state=mid,
                                 output_final_state=True, backend="triton")
    torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(end, final, rtol=1e-5, atol=1e-5)
    # the chunk path's state continues on the Triton path and back
    _, mid_chunk = lightning_attention(q[:, :cut], k[:, :cut], v[:, :cut], decay, output_final_state=True,
                                       backend="chunk")
    b2 = lightning_attention(q[:, cut:], k[:, cut:], v[:, cut:], decay, initial_state=mid_chunk, backend="triton")
    b3 = lightning_attention(q[:, cut:], k[:, cut:], v[:, cut:], decay, initial_state=mid, backend="chunk")
    torch.testing.assert_close(b2, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b3, b, rtol=1e-5, atol=1e-5)


def test_lightning_non_contiguous_inputs():
    # q, k, v as slices of one fused projection, and a (B, H, T, d) tensor seen as (B, T, H, d)
    t, d = 21, 16
    fused = torch.randn(1, t, 2, 3 * d, device=DEVICE)
    q, k = fused[..., :d], fused[..., d:2 * d]
    v = torch.randn(1, 2, t, d, device=DEVICE).transpose(1, 2)
    decay = torch.tensor([0.1, 0.5], device=DEVICE)
    out = lightning_attention(q, k, v, decay, backend="triton")
    ref = lightning_attention(q.double(), k.double(), v.double(), decay.double(), backend="naive")
    assert rel_err(out, ref) <= 1e-5


def test_lightning_triton_refuses_what_it_cannot_do():
    q = torch.randn(1, 8, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="decay slopes as constants"):
        lightning_attention(q, q, q, torch.tensor([0.1, 0.2], device=DEVICE, requires_grad=True), backend="triton")
    with pytest.raises(TypeError, match="float64 runs on backend='chunk'"):
        lightning_attention(q.double(), q.double(), q.double(), torch.tensor([0.1, 0.2], device=DEVICE),
                            backend="triton")


# ---------------------------------------------------------------------------------------------- BASED
def based_case(t: int, d: int, e: int, with_state: bool, dtype: torch.dtype) -> None:
    n_feat = 1 + d + d * d
    inputs = [randn(1, t, 2, d, dtype=dtype, scale=0.5), randn(1, t, 2, d, dtype=dtype, scale=0.5),
              randn(1, t, 2, e, dtype=dtype)]
    if with_state:  # a state as an earlier segment leaves it: z's order-0 entry counts tokens
        inputs += [randn(1, 2, n_feat, e), (torch.rand(1, 2, n_feat, device=DEVICE) + 1).requires_grad_()]

    def run(backend):
        def fn(q, k, v, s0=None, z0=None):
            state = None if s0 is None else (s0, z0)
            return based_linear_attention(q, k, v, initial_state=state, output_final_state=True, backend=backend)
        return fn
    assert_matches_oracle(run("triton"), run("naive"), inputs, dtype)


@pytest.mark.parametrize("t,d,e,with_state,dtype", [
    (37, 4, 16, True, torch.float32),     # odd T over 3 blocks, small feature dim
    (37, 16, 32, True, torch.float32),    # the layer's d_f = 16: 273 features; 2 value tiles
    (5, 16, 16, False, torch.float32),    # T shorter than a block
    (37, 16, 16, True, torch.bfloat16),
], ids=["d4-state", "d16-state", "short", "bf16"])
def test_based_matches_oracle(t, d, e, with_state, dtype):
    based_case(t, d, e, with_state, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("t,d,e,with_state", [
    (1, 16, 16, True), (16, 16, 16, False), (64, 16, 32, True), (50, 4, 32, False), (37, 8, 48, True),
])
def test_based_matches_oracle_sweep(t, d, e, with_state, dtype):
    based_case(t, d, e, with_state, dtype)


def test_based_state_passing_chains_and_matches_chunk():
    t, cut = 40, 23
    q, k = (torch.randn(1, t, 2, 16, device=DEVICE) * 0.5 for _ in range(2))
    v = torch.randn(1, t, 2, 16, device=DEVICE)
    whole, (s_end, z_end) = based_linear_attention(q, k, v, output_final_state=True, backend="triton")
    a, mid = based_linear_attention(q[:, :cut], k[:, :cut], v[:, :cut], output_final_state=True, backend="triton")
    b, (s2, z2) = based_linear_attention(q[:, cut:], k[:, cut:], v[:, cut:], initial_state=mid,
                                         output_final_state=True, backend="triton")
    torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, s_end, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z2, z_end, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_end[..., 0], torch.full_like(z_end[..., 0], t))  # padding stays out of z
    # the state layouts agree: the chunk path's state continues on the Triton path and back
    _, mid_chunk = based_linear_attention(q[:, :cut], k[:, :cut], v[:, :cut], output_final_state=True,
                                          backend="chunk")
    b2 = based_linear_attention(q[:, cut:], k[:, cut:], v[:, cut:], initial_state=mid_chunk, backend="triton")
    b3 = based_linear_attention(q[:, cut:], k[:, cut:], v[:, cut:], initial_state=mid, backend="chunk")
    torch.testing.assert_close(b2, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b3, b, rtol=1e-5, atol=1e-5)


def test_based_non_contiguous_inputs():
    t, d = 21, 4
    fused = torch.randn(1, t, 2, 2 * d + 16, device=DEVICE)
    q, k, v = fused[..., :d], fused[..., d:2 * d], fused[..., 2 * d:]
    q = torch.randn(1, 2, t, d, device=DEVICE).transpose(1, 2)
    out = based_linear_attention(q, k, v, backend="triton")
    ref = based_linear_attention(q.double(), k.double(), v.double(), backend="naive")
    assert rel_err(out, ref) <= 1e-5


def test_based_triton_refuses_float64():
    q = torch.randn(1, 8, 2, 4, device=DEVICE, dtype=F64)
    with pytest.raises(TypeError, match="float64 runs on backend='chunk'"):
        based_linear_attention(q, q, q, backend="triton")
