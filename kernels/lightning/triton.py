"""Lightning attention in Triton, forward and backward.

Both directions are sequential scans over blocks of BT tokens.  A program owns one (batch, head) and a tile of BV
value columns; it carries the BK x BV slice of the decayed k^T v state in registers (float32) from block to block:

    forward  (`_scan_kernel`):    O  = (Q K^T * M) V + lambda^(i+1) Q S;       S <- lambda^L S + (K lambda^(L-1-j))^T V
    backward (`_reverse_kernel`): dV = (K Q^T * M^T) dO + lambda^(L-1-j) K G;  G <- lambda^L G + (Q lambda^(i+1))^T dO

where M_ij = lambda^(i-j) for j <= i inside the block and L is the number of real tokens in it.  Every exponent is
of a non-negative offset (exp(-s*n), n >= 0): the exp(+s*j) form overflows float32.

The backward reuses the two kernels with the roles of the tensors swapped, so there is no cross-program reduction:
  dq = forward scan with (q, k, v, S0) -> (dO, v, k, S0^T)       (dq_i = sum_j lambda^(i-j) (dO_i . v_j) k_j + ...)
  dv = reverse scan with (q, k, dO), G starting at dFinal; the G left after block 0 is d initial_state
  dk = reverse scan with (dO, v, q), G starting at dFinal^T      (dk_j = sum_i lambda^(i-j) (v_j . dO_i) q_i + ...)
The decay slopes are constants here (TNL uses fixed slopes); their gradient is not computed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dispatch import TRITON_DTYPES
from kernels.triton_dots import dot, mm, round_to
from kernels.triton_support import (
    autotune,
    contiguous_last,
    kernel_op,
    output_buffer,
    padded_width,
    strides3,
    traceable,
)

# The first config is what the CPU interpreter runs: small tiles, so tiny test shapes still span several blocks and
# several value tiles.  On a GPU the autotuner picks among all of them.
_CONFIGS = [
    triton.Config({"BT": 16, "BV": 16}, num_warps=4),
    triton.Config({"BT": 32, "BV": 32}, num_warps=4),
    triton.Config({"BT": 64, "BV": 32}, num_warps=4),
    triton.Config({"BT": 64, "BV": 64}, num_warps=4),
    triton.Config({"BT": 64, "BV": 64}, num_warps=8),
    triton.Config({"BT": 128, "BV": 64}, num_warps=8),
]


def _prune_for_float32(configs, named_args, **kwargs):
    """float32 inputs take IEEE float32 products (no tensor cores), whose operands are staged through shared memory:
    compiled for sm_90 (d = 128), BT x BV = 64 x 32 needs 180 KB of it and 128 x 64 needs 426 KB, over the 227 KB
    an H100 has.  Skip what cannot launch rather than compile it during autotuning."""
    if named_args["q_ptr"].dtype != torch.float32:
        return configs
    return [c for c in configs if c.kwargs["BT"] * c.kwargs["BV"] <= 64 * 32]


_PRUNE = {"early_config_prune": _prune_for_float32}
# HYLO_AUTOTUNE=lean: 32x32 w4 and 64x64 w8 spill least on sm_90 in bf16 (bench/kernel_report.py, d = 128).
_LEAN = (1, 4)


@autotune(configs=_CONFIGS, key=["DK", "DV"], prune_configs_by=_PRUNE, lean=_LEAN)
@triton.jit(do_not_specialize=["T"])
def _scan_kernel(q_ptr, k_ptr, v_ptr, o_ptr, decay_ptr, s0_ptr, final_ptr,
                 sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                 ss_bh, ss_r, ss_c, sf_bh, sf_r, sf_c,
                 T, H, DK, DV,
                 HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr,
                 BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """q, k (B, T, H, DK), v, o (B, T, H, DV) with unit stride in the last dim; the initial and final states
    (B*H, DK, DV) are addressed by (per batch*head, row, column) strides, so a transposed state is swapped strides."""
    DT = q_ptr.dtype.element_ty  # the inputs' dtype, for mm
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    s = tl.load(decay_ptr + h).to(tl.float32)

    rt = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    o_base = o_ptr + b * sob + h * soh
    state_mask = mk[:, None] & mv[None, :]

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INITIAL:
        state = tl.load(s0_ptr + bh.to(tl.int64) * ss_bh + rk[:, None] * ss_r + rv[None, :] * ss_c,
                        mask=state_mask, other=0.0).to(tl.float32)

    # Decays that depend only on positions inside a block.  The clamp keeps masked-out exponents finite.
    dist = rt[:, None] - rt[None, :]
    intra = tl.where(dist >= 0, tl.exp(-s * tl.maximum(dist, 0).to(tl.float32)), 0.0)  # lambda^(i-j), j <= i
    q_decay = tl.exp(-s * (rt + 1).to(tl.float32))  # lambda^(i+1): reading the state left by earlier blocks

    for start in range(0, T, BT):
        rows = start + rt
        mt = rows < T
        q = tl.load(q_base + rows[:, None].to(tl.int64) * sqt + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        k = tl.load(k_base + rows[:, None].to(tl.int64) * skt + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        v = tl.load(v_base + rows[:, None].to(tl.int64) * svt + rv[None, :], mask=mt[:, None] & mv[None, :], other=0.0)

        scores = dot(q, tl.trans(k)) * intra
        o = mm(scores, v, DT)
        o += mm(q, state, DT) * q_decay[:, None]
        tl.store(o_base + rows[:, None].to(tl.int64) * sot + rv[None, :], round_to(o, o_ptr.dtype.element_ty),
                 mask=mt[:, None] & mv[None, :])

        # Decay each key to the block's last real token (padded keys are zero, so their clamped decay is moot).
        n_valid = tl.minimum(T - start, BT)
        k_decay = tl.exp(-s * tl.maximum(n_valid - 1 - rt, 0).to(tl.float32))
        kv = mm(tl.trans(k * k_decay[:, None]), v, DT)
        state = state * tl.exp(-s * n_valid.to(tl.float32)) + kv

    if STORE_FINAL:
        tl.store(final_ptr + bh.to(tl.int64) * sf_bh + rk[:, None] * sf_r + rv[None, :] * sf_c, state,
                 mask=state_mask)


@autotune(configs=_CONFIGS, key=["DK", "DV"], prune_configs_by=_PRUNE, lean=_LEAN)
@triton.jit(do_not_specialize=["T"])
def _reverse_kernel(q_ptr, k_ptr, do_ptr, dv_ptr, decay_ptr, dfinal_ptr, ds0_ptr,
                    sqb, sqt, sqh, skb, skt, skh, sdob, sdot, sdoh, sdvb, sdvt, sdvh,
                    sf_bh, sf_r, sf_c,
                    T, H, DK, DV,
                    HAS_DFINAL: tl.constexpr, STORE_DS0: tl.constexpr,
                    BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """dv_j = sum_{i>=j} lambda^(i-j) (k_j . q_i) dO_i + lambda^(T-1-j) k_j dFinal, scanning blocks last to first
    and carrying G (DK x BV): the gradient reaching the state from every later query and from dFinal.  d initial
    state (contiguous (B*H, DK, DV)) is the G left after the first block."""
    DT = q_ptr.dtype.element_ty  # the inputs' dtype, for mm
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    s = tl.load(decay_ptr + h).to(tl.float32)

    rt = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    do_base = do_ptr + b * sdob + h * sdoh
    dv_base = dv_ptr + b * sdvb + h * sdvh
    state_mask = mk[:, None] & mv[None, :]

    g = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DFINAL:
        g = tl.load(dfinal_ptr + bh.to(tl.int64) * sf_bh + rk[:, None] * sf_r + rv[None, :] * sf_c,
                    mask=state_mask, other=0.0).to(tl.float32)

    # Rows are keys j, columns queries i: the transpose of the forward's mask.
    dist = rt[None, :] - rt[:, None]
    intra_t = tl.where(dist >= 0, tl.exp(-s * tl.maximum(dist, 0).to(tl.float32)), 0.0)
    q_decay = tl.exp(-s * (rt + 1).to(tl.float32))

    n_blocks = tl.cdiv(T, BT)
    for n in range(0, n_blocks):
        start = (n_blocks - 1 - n) * BT
        rows = start + rt
        mt = rows < T
        q = tl.load(q_base + rows[:, None].to(tl.int64) * sqt + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        k = tl.load(k_base + rows[:, None].to(tl.int64) * skt + rk[None, :], mask=mt[:, None] & mk[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None].to(tl.int64) * sdot + rv[None, :], mask=mt[:, None] & mv[None, :],
                     other=0.0)

        scores_t = dot(k, tl.trans(q)) * intra_t
        dv = mm(scores_t, do, DT)
        n_valid = tl.minimum(T - start, BT)
        k_decay = tl.exp(-s * tl.maximum(n_valid - 1 - rt, 0).to(tl.float32))  # lambda^(block end - j)
        dv += mm(k, g, DT) * k_decay[:, None]
        tl.store(dv_base + rows[:, None].to(tl.int64) * sdvt + rv[None, :], round_to(dv, dv_ptr.dtype.element_ty),
                 mask=mt[:, None] & mv[None, :])

        # G now covers this block's queries too, measured from the end of the previous block.
        qd = mm(tl.trans(q * q_decay[:, None]), do, DT)
        g = g * tl.exp(-s * n_valid.to(tl.float32)) + qd

    if STORE_DS0:
        tl.store(ds0_ptr + bh.to(tl.int64) * DK * DV + rk[:, None] * DV + rv[None, :], g, mask=state_mask)


def _scan(q, k, v, out, decay, s0, s0_strides, final) -> None:
    """out = the forward scan of (q, k, v) from state s0 (None: zero); final (or None) receives the last state."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    dummy = decay  # never read: the constexpr flags compile the accesses out
    traceable(_scan_kernel)[lambda meta: (b * h, triton.cdiv(dv, meta["BV"]))](
        q, k, v, out, decay, dummy if s0 is None else s0, dummy if final is None else final,
        *strides3(q), *strides3(k), *strides3(v), *strides3(out), *s0_strides, *_state_strides(final),
        t, h, dk, dv,
        HAS_INITIAL=s0 is not None, STORE_FINAL=final is not None, BK=padded_width(dk))


def _reverse(q, k, do, dv_out, decay, dfinal, dfinal_strides, ds0) -> None:
    b, t, h, dk = q.shape
    dv = do.shape[-1]
    dummy = decay
    traceable(_reverse_kernel)[lambda meta: (b * h, triton.cdiv(dv, meta["BV"]))](
        q, k, do, dv_out, decay, dummy if dfinal is None else dfinal, dummy if ds0 is None else ds0,
        *strides3(q), *strides3(k), *strides3(do), *strides3(dv_out), *dfinal_strides,
        t, h, dk, dv,
        HAS_DFINAL=dfinal is not None, STORE_DS0=ds0 is not None, BK=padded_width(dk))


def _state_strides(x: torch.Tensor | None, transpose: bool = False) -> tuple[int, int, int]:
    """(per batch*head, row, column) strides of a contiguous (B, H, R, C) state, or of its transpose."""
    if x is None:
        return 0, 0, 0
    r, c = x.shape[-2:]
    return (r * c, 1, c) if transpose else (r * c, c, 1)


# Registered with torch.library (hylo::lightning_forward / hylo::lightning_backward): one op each under
# torch.compile(fullgraph=True); autograd joins them.
@kernel_op("hylo::lightning_forward")
def _lightning_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                       initial_state: torch.Tensor | None, output_final_state: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, T, H, e), final state (B, H, d, e) fp32 (empty unless output_final_state)."""
    b, t, h, d = q.shape
    e = v.shape[-1]
    q, k, v = (contiguous_last(x) for x in (q, k, v))
    decay = decay.to(device=q.device, dtype=torch.float32).contiguous()
    s0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    out = output_buffer((b, t, h, e), q.dtype, q.device)
    final = output_buffer((b, h, d, e), torch.float32, q.device) if output_final_state else None
    _scan(q, k, v, out, decay, s0, _state_strides(s0), final)
    return out, q.new_empty(0, dtype=torch.float32) if final is None else final


@_lightning_forward.register_fake
def _(q, k, v, decay, initial_state, output_final_state):
    b, t, h, d = q.shape
    final = (b, h, d, v.shape[-1]) if output_final_state else (0,)
    return q.new_empty(b, t, h, v.shape[-1]), q.new_empty(final, dtype=torch.float32)


@kernel_op("hylo::lightning_backward")
def _lightning_backward(d_out: torch.Tensor, d_final: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, decay: torch.Tensor, initial_state: torch.Tensor | None, want_ds0: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv, d initial_state (fp32; empty unless want_ds0)."""
    q, k, v = (contiguous_last(x) for x in (q, k, v))
    decay = decay.to(device=q.device, dtype=torch.float32).contiguous()
    s0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    d_out = contiguous_last(d_out.to(q.dtype))
    d_final = None if d_final is None else d_final.to(torch.float32).contiguous()
    dq, dk, dv = (output_buffer(x.shape, x.dtype, x.device) for x in (q, k, v))
    ds0 = output_buffer(s0.shape, torch.float32, q.device) if want_ds0 and s0 is not None else None
    _scan(d_out, v, k, dq, decay, s0, _state_strides(s0, transpose=True), None)
    _reverse(q, k, d_out, dv, decay, d_final, _state_strides(d_final), ds0)
    _reverse(d_out, v, q, dk, decay, d_final, _state_strides(d_final, transpose=True), None)
    return dq, dk, dv, q.new_empty(0, dtype=torch.float32) if ds0 is None else ds0


@_lightning_backward.register_fake
def _(d_out, d_final, q, k, v, decay, initial_state, want_ds0):
    ds0 = initial_state.shape if want_ds0 and initial_state is not None else (0,)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(ds0, dtype=torch.float32))


def _lightning_setup(ctx, inputs, output):
    q, k, v, decay, initial_state, output_final_state = inputs
    ctx.save_for_backward(q, k, v, decay, initial_state)
    ctx.output_final_state = output_final_state


def _lightning_grads(ctx, d_out, d_final):
    q, k, v, decay, initial_state = ctx.saved_tensors
    d_out = torch.zeros_like(v, dtype=q.dtype) if d_out is None else d_out
    d_final = d_final if ctx.output_final_state else None
    want_ds0 = initial_state is not None and ctx.needs_input_grad[4]
    dq, dk, dv, ds0 = _lightning_backward(d_out, d_final, q, k, v, decay, initial_state, want_ds0)
    return dq, dk, dv, None, ds0.to(initial_state.dtype) if want_ds0 else None, None


_lightning_forward.register_autograd(_lightning_grads, setup_context=_lightning_setup)


def triton_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                               initial_state: torch.Tensor | None = None, output_final_state: bool = False):
    """-> out (B, T, H, e) in q's dtype, or (out, final state (B, H, d, e) float32) with `output_final_state`.
    Inputs float32/bfloat16/float16 (float32 state and accumulation); `decay` is a constant (no gradient)."""
    if q.dtype not in TRITON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"backend='triton' takes float32/bfloat16/float16 q, k, v of one dtype, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype} (float64 runs on backend='chunk')")
    if decay.requires_grad:
        raise ValueError("backend='triton' treats the decay slopes as constants and has no gradient for them; "
                         "pass decay.detach() (TNL's slopes are a fixed buffer) or use backend='chunk'")
    out, final = _lightning_forward(q, k, v, decay, initial_state, output_final_state)
    return (out, final) if output_final_state else out
