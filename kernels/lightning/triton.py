"""Lightning attention in Triton, chunk-parallel (the split of fla's `chunk_fwd_h` / `chunk_fwd_o`).

Tokens are cut into chunks of BT.  With lambda = exp(-s) per head, M_ij = lambda^(i-j) for j <= i inside a chunk,
L_c the real tokens of chunk c and h_c the (DK x DV, fp32) state entering chunk c (h_0 = the initial state):

  states (sequential, `_states_kernel`):   h_{c+1} = lambda^(L_c) h_c + (K_c * lambda^(L_c-1-j))^T V_c
  output (parallel over chunks):           O_c = (Q_c K_c^T * M) V_c + lambda^(i+1) Q_c h_c

Only the state recurrence walks the chunks in order (one small matmul per chunk, a program per (batch*head, value
tile)); the outputs, and all of the backward's per-token work, run one program per chunk, so a long sequence
fills the GPU even at batch 1.  The backward mirrors it:

  d states (sequential, reverse):  G_c = lambda^(L_c) G_{c+1} + (Q_c * lambda^(i+1))^T dO_c,  G_T = dFinal, G_0 = dS0
  gradients (parallel):            dQ = (dO V^T * M) K + lambda^(i+1) dO h_c^T
                                   dK = (dO V^T * M)^T Q + lambda^(L_c-1-j) V G_{c+1}^T
                                   dV = (Q K^T * M)^T dO + lambda^(L_c-1-j) K G_{c+1}

with the forward states recomputed rather than kept from the forward (fla does the same).  The states are
accumulated in fp32 registers and stored in the inputs' dtype for the next dots: every product is one pass of
bf16/fp16 tensor-core dots with fp32 accumulation (fp32 inputs: exact IEEE fp32 dots and fp32 states).  Every
exponent is of a non-negative offset (exp(-s*n), n >= 0): the exp(+s*j) form overflows float32.  The decay slopes
are constants here (TNL uses fixed slopes); their gradient is not computed.

Packed documents (`cu_seqlens`, batch 1) run in the same three launches, fla's varlen layout: every document is cut
into chunks of its own ([bos, bos + BT), ...; its last chunk may be short), so no chunk holds two documents.  The
state pass runs one program per (document, head, tile) starting from zero (the initial state for the first
document only), and the output and gradient kernels one program per chunk of any document, looked up in a table
of chunk rows.  No work crosses a boundary and there is no mask beyond the causal one inside each chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hylo.kernels.dispatch import TRITON_DTYPES
from hylo.kernels.triton_dots import dot, round_to
from hylo.kernels.triton_support import (
    autotune,
    contiguous_last,
    interpreting,
    kernel_op,
    output_buffer,
    padded_width,
    strides3,
    traceable,
)
from hylo.kernels.triton_varlen import chunk_program, state_program
from hylo.kernels.varlen import ChunkTable, chunk_table

# Chunk length: 64 on a GPU (fla's choice: 64 x 64 score tiles on tensor cores); 16 under the interpreter, so tiny
# test shapes span several chunks.
CHUNK = 16 if interpreting() else 64
# The state pass tiles both head dims (fla's chunk_fwd_h does too): the more (key tile, value tile) programs, the
# more of the GPU the one sequential part fills at batch 1.  The first config is what the interpreter runs.
_STATE_CONFIGS = [
    triton.Config({"BK": 16, "BV": 16}, num_warps=4),
    triton.Config({"BK": 64, "BV": 32}, num_warps=4),
    triton.Config({"BK": 64, "BV": 64}, num_warps=4),
    triton.Config({"BK": 32, "BV": 64}, num_warps=4),
    triton.Config({"BK": 64, "BV": 64}, num_warps=8),
]
_OUT_CONFIGS = [
    triton.Config({"BV": 16}, num_warps=4),
    triton.Config({"BV": 32}, num_warps=4),
    triton.Config({"BV": 64}, num_warps=4),
    triton.Config({"BV": 128}, num_warps=8),
]


def _prune_for_float32(configs, named_args, **kwargs):
    """float32 inputs take IEEE fp32 dots (no tensor cores), staged through shared memory: keep the value tiles
    small enough to fit an H100's 227 KB at d = 128 (bench/kernel_report.py)."""
    if named_args["K"].dtype != torch.float32:
        return configs
    return [c for c in configs if c.kwargs["BV"] <= 32] or configs[:1]


_PRUNE = {"early_config_prune": _prune_for_float32}
# HYLO_AUTOTUNE=lean: value tiles of 32 and 64 (bench/kernel_report.py, sm_90, bf16, d = 128).
_LEAN = (1, 2)


@triton.jit
def _rows(K, row0, end, s_t, offs_k, mask_k, BT: tl.constexpr):
    """Rows [row0, row0 + BT) of a (T, D) slice, those before `end` real: the tile, and each row's validity."""
    rows = row0 + tl.arange(0, BT)
    ok = rows < end
    return tl.load(K + rows.to(tl.int64)[:, None] * s_t + offs_k[None, :], mask=ok[:, None] & mask_k[None, :],
                   other=0.0), ok


@triton.jit
def _spread(flag, offs_k, offs_v):
    """A scalar condition as a (BK, BV) mask (block masks cannot take a scalar operand everywhere)."""
    return (offs_k[:, None] * 0 + offs_v[None, :] * 0 + flag.to(tl.int32)) != 0


@autotune(configs=_STATE_CONFIGS, key=["DK", "DV", "REVERSE"], prune_configs_by=_PRUNE, lean=_LEAN)
@triton.jit(do_not_specialize=["T", "NC", "n_docs"])
def _states_kernel(K, V, DECAY, INIT, STATES, FINAL, CU, CHUNK0,
                   sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, si_bh, si_r, si_c,
                   T, H, DK, DV, NC, n_docs,
                   HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr,
                   BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """The sequential part, one (key tile, value tile) of the state per program.  Forward: STATES[bh, c] = h_c
    (before chunk c), then h <- lambda^L h + (K*w)^T V with
    w_j = lambda^(L-1-j).  REVERSE (K = Q, V = dO): STATES[bh, c] = G_{c+1} (after chunk c), then
    G <- lambda^L G + (Q*w)^T dO with w_i = lambda^(i+1).  STATES (B*H, NT, DK, DV) in the inputs' dtype; INIT and
    FINAL (B*H, DK, DV) fp32, INIT addressed by strides (a transposed state is swapped strides).  VARLEN: one
    program per (document, head); STATES (H, NC, DK, DV) by the chunk table (CHUNK0: each document's first chunk);
    INIT enters the first document walked (the last one in REVERSE), FINAL is the last one's."""
    b, h, row, bos, T, slot0, enters, leaves = state_program(tl.program_id(0), T, H, NC, n_docs, CU, CHUNK0, VARLEN,
                                                             REVERSE, BT)
    s = tl.load(DECAY + h).to(tl.float32)
    offs_k, offs_v = tl.program_id(2) * BK + tl.arange(0, BK), tl.program_id(1) * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < DK, offs_v < DV
    state_mask = mask_k[:, None] & mask_v[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        state = tl.load(INIT + row.to(tl.int64) * si_bh + offs_k[:, None] * si_r + offs_v[None, :] * si_c,
                        mask=state_mask & _spread(enters, offs_k, offs_v), other=0.0).to(tl.float32)
    k_base, v_base = K + b * sk_b + h * sk_h + bos * sk_t, V + b * sv_b + h * sv_h + bos * sv_t
    n_chunks = tl.cdiv(T, BT)
    rt = tl.arange(0, BT)
    for n in range(0, n_chunks):
        c = n_chunks - 1 - n if REVERSE else n
        slot = STATES + (slot0 + c) * DK * DV
        tl.store(slot + offs_k[:, None] * DV + offs_v[None, :], round_to(state, STATES.dtype.element_ty),
                 mask=state_mask)
        k, ok = _rows(k_base, c * BT, T, sk_t, offs_k, mask_k, BT)
        rows = c * BT + rt
        v = tl.load(v_base + rows.to(tl.int64)[:, None] * sv_t + offs_v[None, :],
                    mask=ok[:, None] & mask_v[None, :], other=0.0)
        n_valid = tl.minimum(T - c * BT, BT)
        if REVERSE:
            w = tl.exp(-s * (rt + 1).to(tl.float32))
        else:  # the clamp keeps padded rows' exponents finite (their keys are zero)
            w = tl.exp(-s * tl.maximum(n_valid - 1 - rt, 0).to(tl.float32))
        k = round_to(k * w[:, None], k.dtype)
        state = state * tl.exp(-s * n_valid.to(tl.float32)) + dot(tl.trans(k), v)
    if STORE_FINAL:
        tl.store(FINAL + row.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :], state,
                 mask=state_mask & _spread(leaves, offs_k, offs_v))


@autotune(configs=_OUT_CONFIGS, key=["DK", "DV"], prune_configs_by=_PRUNE, lean=_LEAN)
@triton.jit(do_not_specialize=["T", "NC"])
def _output_kernel(Q, K, V, O, DECAY, STATES, CHUNK_ROWS,
                   sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h,
                   T, H, DK, DV, NC,
                   VARLEN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """One chunk, one value tile: O_c = (Q K^T * M) V + lambda^(i+1) Q h_c."""
    b, h, row0, end, slot = chunk_program(tl.program_id(0), tl.program_id(1), T, H, NC, CHUNK_ROWS, VARLEN, BT)
    s = tl.load(DECAY + h).to(tl.float32)
    offs_k, offs_v = tl.arange(0, BK), tl.program_id(2) * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < DK, offs_v < DV
    rt = tl.arange(0, BT)
    rows = row0 + rt
    q, ok = _rows(Q + b * sq_b + h * sq_h, row0, end, sq_t, offs_k, mask_k, BT)
    k, _ = _rows(K + b * sk_b + h * sk_h, row0, end, sk_t, offs_k, mask_k, BT)
    v = tl.load(V + b * sv_b + h * sv_h + rows.to(tl.int64)[:, None] * sv_t + offs_v[None, :],
                mask=ok[:, None] & mask_v[None, :], other=0.0)
    state = tl.load(STATES + slot * DK * DV + offs_k[:, None] * DV + offs_v[None, :],
                    mask=mask_k[:, None] & mask_v[None, :], other=0.0)
    dist = rt[:, None] - rt[None, :]
    decay = tl.where(dist >= 0, tl.exp(-s * tl.maximum(dist, 0).to(tl.float32)), 0.0)
    scores = round_to(dot(q, tl.trans(k)) * decay, q.dtype)
    o = dot(scores, v) + dot(q, state) * tl.exp(-s * (rt + 1).to(tl.float32))[:, None]
    tl.store(O + b * so_b + h * so_h + rows.to(tl.int64)[:, None] * so_t + offs_v[None, :],
             round_to(o, O.dtype.element_ty), mask=ok[:, None] & mask_v[None, :])


@triton.jit(do_not_specialize=["T", "NC"])
def _grads_kernel(Q, K, V, DO, DECAY, STATES, DSTATES, DQ, DK_, DV_, CHUNK_ROWS,
                  sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h, sx_b, sx_t, sx_h,
                  sy_b, sy_t, sy_h, T, H, DK, DV, NC,
                  VARLEN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """One chunk: dQ, dK (sx_* strides) and dV (sy_*), from the chunk's tokens, the state entering it (STATES) and
    the gradient of the state leaving it (DSTATES).  Whole head dims per program (BK, BV >= DK, DV)."""
    b, h, row0, end, chunk_slot = chunk_program(tl.program_id(0), tl.program_id(1), T, H, NC, CHUNK_ROWS, VARLEN, BT)
    s = tl.load(DECAY + h).to(tl.float32)
    offs_k, offs_v = tl.arange(0, BK), tl.arange(0, BV)
    mask_k, mask_v = offs_k < DK, offs_v < DV
    rt = tl.arange(0, BT)
    q, ok = _rows(Q + b * sq_b + h * sq_h, row0, end, sq_t, offs_k, mask_k, BT)
    k, _ = _rows(K + b * sk_b + h * sk_h, row0, end, sk_t, offs_k, mask_k, BT)
    v, _ = _rows(V + b * sv_b + h * sv_h, row0, end, sv_t, offs_v, mask_v, BT)
    do, _ = _rows(DO + b * sdo_b + h * sdo_h, row0, end, sdo_t, offs_v, mask_v, BT)
    slot = chunk_slot * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    state_mask = mask_k[:, None] & mask_v[None, :]
    state = tl.load(STATES + slot, mask=state_mask, other=0.0)  # h_c
    d_state = tl.load(DSTATES + slot, mask=state_mask, other=0.0)  # G_{c+1}

    n_valid = tl.minimum(end - row0, BT)
    dist = rt[:, None] - rt[None, :]
    decay = tl.where(dist >= 0, tl.exp(-s * tl.maximum(dist, 0).to(tl.float32)), 0.0)  # M (queries x keys)
    q_w = tl.exp(-s * (rt + 1).to(tl.float32))[:, None]  # lambda^(i+1)
    k_w = tl.exp(-s * tl.maximum(n_valid - 1 - rt, 0).to(tl.float32))[:, None]  # lambda^(L-1-j)

    ds = round_to(dot(do, tl.trans(v)) * decay, q.dtype)  # (dO V^T) * M
    dq = dot(ds, k) + dot(do, tl.trans(state)) * q_w
    dk = dot(tl.trans(ds), q) + dot(v, tl.trans(d_state)) * k_w
    scores = round_to(dot(q, tl.trans(k)) * decay, q.dtype)  # (Q K^T) * M
    dv = dot(tl.trans(scores), do) + dot(k, d_state) * k_w
    rows = (row0 + rt).to(tl.int64)[:, None]
    tl.store(DQ + b * sx_b + h * sx_h + rows * sx_t + offs_k[None, :], round_to(dq, DQ.dtype.element_ty),
             mask=ok[:, None] & mask_k[None, :])
    tl.store(DK_ + b * sx_b + h * sx_h + rows * sx_t + offs_k[None, :], round_to(dk, DK_.dtype.element_ty),
             mask=ok[:, None] & mask_k[None, :])
    tl.store(DV_ + b * sy_b + h * sy_h + rows * sy_t + offs_v[None, :], round_to(dv, DV_.dtype.element_ty),
             mask=ok[:, None] & mask_v[None, :])


# ---------------------------------------------------------------------------------------------- launchers
def _state_strides(x: torch.Tensor | None, transpose: bool = False) -> tuple[int, int, int]:
    """(per batch*head, row, column) strides of a contiguous (B, H, R, C) state, or of its transpose."""
    if x is None:
        return 0, 0, 0
    r, c = x.shape[-2:]
    return (r * c, 1, c) if transpose else (r * c, c, 1)


def _state_pass(k, v, decay, init, init_strides, final, reverse: bool, docs: ChunkTable | None) -> torch.Tensor:
    """Runs `_states_kernel`; returns the per-chunk states (B*H or H, NT or NC, DK, DV) in k's dtype."""
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    n_docs = 1 if docs is None else docs.documents
    n_chunks = triton.cdiv(t, CHUNK) if docs is None else docs.chunks
    states = output_buffer((b * h, n_chunks, dk, dv), k.dtype, k.device)
    dummy = decay  # never read: the constexpr flags compile the accesses out
    grid = lambda meta: (b * h * n_docs, triton.cdiv(dv, meta["BV"]), triton.cdiv(dk, meta["BK"]))  # noqa: E731
    traceable(_states_kernel)[grid](
        k, v, decay, dummy if init is None else init, states, dummy if final is None else final,
        dummy if docs is None else docs.cu, dummy if docs is None else docs.first_chunk,
        *strides3(k), *strides3(v), *init_strides, t, h, dk, dv, n_chunks, n_docs,
        HAS_INIT=init is not None, STORE_FINAL=final is not None, REVERSE=reverse, VARLEN=docs is not None,
        BT=CHUNK)
    return states


def _prepare(q, k, v, decay, initial_state):
    q, k, v = (contiguous_last(x) for x in (q, k, v))
    decay = decay.to(device=q.device, dtype=torch.float32).contiguous()
    s0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    return q, k, v, decay, s0


# Registered with torch.library (hylo::lightning_forward / hylo::lightning_backward): one op each under
# torch.compile(fullgraph=True); autograd joins them.
@kernel_op("hylo::lightning_forward")
def _lightning_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                       initial_state: torch.Tensor | None, output_final_state: bool, cu_seqlens: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, T, H, e), final state (B, H, d, e) fp32 (empty unless output_final_state)."""
    b, t, h, d = q.shape
    e = v.shape[-1]
    q, k, v, decay, s0 = _prepare(q, k, v, decay, initial_state)
    docs = None if cu_seqlens is None else chunk_table(cu_seqlens, CHUNK, q.device)
    final = output_buffer((b, h, d, e), torch.float32, q.device) if output_final_state else None
    states = _state_pass(k, v, decay, s0, _state_strides(s0), final, reverse=False, docs=docs)
    out = output_buffer((b, t, h, e), q.dtype, q.device)
    chunks = triton.cdiv(t, CHUNK) if docs is None else docs.chunks
    traceable(_output_kernel)[lambda meta: (b * h, chunks, triton.cdiv(e, meta["BV"]))](
        q, k, v, out, decay, states, decay if docs is None else docs.rows,
        *strides3(q), *strides3(k), *strides3(v), *strides3(out), t, h, d, e, chunks,
        VARLEN=docs is not None, BK=padded_width(d), BT=CHUNK)
    return out, q.new_empty(0, dtype=torch.float32) if final is None else final


@_lightning_forward.register_fake
def _(q, k, v, decay, initial_state, output_final_state, cu_seqlens):
    b, t, h, d = q.shape
    final = (b, h, d, v.shape[-1]) if output_final_state else (0,)
    return q.new_empty(b, t, h, v.shape[-1]), q.new_empty(final, dtype=torch.float32)


@kernel_op("hylo::lightning_backward")
def _lightning_backward(d_out: torch.Tensor, d_final: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, decay: torch.Tensor, initial_state: torch.Tensor | None, want_ds0: bool,
                        cu_seqlens: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv, d initial_state (fp32; empty unless want_ds0)."""
    b, t, h, d = q.shape
    e = v.shape[-1]
    q, k, v, decay, s0 = _prepare(q, k, v, decay, initial_state)
    docs = None if cu_seqlens is None else chunk_table(cu_seqlens, CHUNK, q.device)
    d_out = contiguous_last(d_out.to(q.dtype))
    d_final = None if d_final is None else d_final.to(torch.float32).contiguous()
    ds0 = output_buffer((b, h, d, e), torch.float32, q.device) if want_ds0 and s0 is not None else None
    states = _state_pass(k, v, decay, s0, _state_strides(s0), None, reverse=False, docs=docs)  # recomputed
    d_states = _state_pass(q, d_out, decay, d_final, _state_strides(d_final), ds0, reverse=True, docs=docs)
    dq, dk, dv = (output_buffer(x.shape, x.dtype, x.device) for x in (q, k, v))
    chunks = triton.cdiv(t, CHUNK) if docs is None else docs.chunks
    traceable(_grads_kernel)[(b * h, chunks)](
        q, k, v, d_out, decay, states, d_states, dq, dk, dv, decay if docs is None else docs.rows,
        *strides3(q), *strides3(k), *strides3(v), *strides3(d_out), *strides3(dq), *strides3(dv), t, h, d, e, chunks,
        VARLEN=docs is not None, BK=padded_width(d), BT=CHUNK, BV=padded_width(e),
        num_warps=4 if max(d, e) <= 64 else 8)
    return dq, dk, dv, q.new_empty(0, dtype=torch.float32) if ds0 is None else ds0


@_lightning_backward.register_fake
def _(d_out, d_final, q, k, v, decay, initial_state, want_ds0, cu_seqlens):
    ds0 = initial_state.shape if want_ds0 and initial_state is not None else (0,)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(ds0, dtype=torch.float32))


def _lightning_setup(ctx, inputs, output):
    q, k, v, decay, initial_state, output_final_state, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, decay, initial_state, cu_seqlens)
    ctx.output_final_state = output_final_state


def _lightning_grads(ctx, d_out, d_final):
    q, k, v, decay, initial_state, cu_seqlens = ctx.saved_tensors
    d_out = torch.zeros_like(v, dtype=q.dtype) if d_out is None else d_out
    d_final = d_final if ctx.output_final_state else None
    want_ds0 = initial_state is not None and ctx.needs_input_grad[4]
    dq, dk, dv, ds0 = _lightning_backward(d_out, d_final, q, k, v, decay, initial_state, want_ds0, cu_seqlens)
    return dq, dk, dv, None, ds0.to(initial_state.dtype) if want_ds0 else None, None, None


_lightning_forward.register_autograd(_lightning_grads, setup_context=_lightning_setup)


def triton_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                               initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                               cu_seqlens: torch.Tensor | None = None):
    """-> out (B, T, H, e) in q's dtype, or (out, final state (B, H, d, e) float32) with `output_final_state`.
    Inputs float32/bfloat16/float16 (float32 state and accumulation); `decay` is a constant (no gradient).
    `cu_seqlens` (checked by the caller; batch 1): packed documents in the same launches; the initial state
    enters the first document, the final state is the last one's."""
    if q.dtype not in TRITON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"backend='triton' takes float32/bfloat16/float16 q, k, v of one dtype, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype} (float64 runs on backend='chunk')")
    if decay.requires_grad:
        raise ValueError("backend='triton' treats the decay slopes as constants and has no gradient for them; "
                         "pass decay.detach() (TNL's slopes are a fixed buffer) or use backend='chunk'")
    out, final = _lightning_forward(q, k, v, decay, initial_state, output_final_state, cu_seqlens)
    return (out, final) if output_final_state else out
