"""RAT on Triton, forward and backward.

Same op as `chunk.py` (see `rat_attention` for the math); four pieces, each a kernel:

1. scan (grid: chunks x heads): the gated recurrence k~_t = g_t*k~_{t-1} + (1-g_t)*k_t (and v~) walked token by
   token inside a chunk, in fp32 registers.  It writes k~ and v~ for every token: the backward needs them all,
   and the chunk summaries are simply every L-th row of them (read in place through a strided view, never copied).
2. attention (grid: query blocks x heads): the online softmax starts from the query's own running key (the
   current-token term: a finite logit, so no row ever holds only -inf), then folds in the prefix summaries (seen
   by every query) and this segment's summaries of chunks strictly before the query's chunk.  Starting from the
   own term *is* the log-sum-exp merge: there is no second pass.  Writes o and the row log-sum-exp.
3. backward, summaries side: one kernel gives dq (and delta = rowsum(dO*O)); one gives the gradients of the
   summary keys/values (prefix and in-segment), looping over the query blocks that see them.
4. backward scan (grid: chunks x heads): walks each chunk in reverse, adds the current-token term's gradients
   (recomputed from q, dO, lse, delta: a few vector ops per token, cheaper than storing them) to the summary
   gradient at the chunk's last row, and runs the adjoint recurrence
       acc_t = dk~_t + g_{t+1} * acc_{t+1},   dk_t = (1 - g_t) * acc_t,   dg_t += acc_t * (k~_{t-1} - k_t)
   for k and v at once (the gate is shared, so dg sums both).

Everything accumulates in fp32 whatever the input dtype.  Logits are kept in base 2 (exp2 is the native
instruction); the saved lse is therefore log2-sum-exp2 of scale*log2(e)*q.k, which only these kernels read.
fp32 inputs use exact fp32 dot products (input_precision="ieee"), 16-bit inputs use tf32: its 10-bit mantissa
already exceeds theirs.  16-bit results are stored through `round_to` (round to nearest even, also under the
interpreter, which would otherwise truncate).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.dispatch import TRITON_DTYPES
from kernels.triton_dots import round_to
from kernels.triton_support import autotune, output_buffer, padded_width, require_triton

LOG2E = math.log2(math.e)

# The first config is what the CPU interpreter runs: small blocks, so that tiny test shapes still span several
# query and key blocks.  On a GPU the autotuner benchmarks them all (out-of-resource configs are skipped).
_ATTN_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
]




def _prune_backward(configs, named_args, **kwargs):
    """The backward kernels hold more tiles than the forward: at d >= 128, 128 x 64 needs 256 KB (dq) and 321 KB
    (summary gradients) of shared memory on sm_90 (bench/kernel_report.py), over the 227 KB an H100 has.  Skip what
    cannot launch rather than compile it during autotuning."""
    if kwargs.get("D", named_args.get("D", 0)) < 128:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 64]


# HYLO_AUTOTUNE=lean: 64x32 w4 s2 and 128x32 w8 s2 fit everywhere and spill least on sm_90 in bf16.
_LEAN = (1, 3)


# ---------------------------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["T"])
def _scan_fwd_kernel(K, V, G, KS, VS,
                     sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d, sg_b, sg_t, sg_h, sg_d,
                     T, H, D, L, BLOCK_D: tl.constexpr):
    """One program per (chunk, batch*head): k~, v~ of the chunk's tokens into KS, VS (B, H, T, D) fp32."""
    # Row indices are int64 tensors built from the program id (loop counters are plain ints under the
    # interpreter), so offsets into long sequences cannot overflow.
    row_start = tl.program_id(0).to(tl.int64) * L
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_end = tl.minimum(row_start + L, T)
    k_acc = tl.zeros([BLOCK_D], dtype=tl.float32)  # zero state: the recurrence restarts at every chunk
    v_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, row_end - row_start):
        t64 = row_start + i
        g = tl.load(G + b * sg_b + h * sg_h + t64 * sg_t + offs_d * sg_d, mask=d_ok, other=0.0).to(tl.float32)
        k = tl.load(K + b * sk_b + h * sk_h + t64 * sk_t + offs_d * sk_d, mask=d_ok, other=0.0).to(tl.float32)
        v = tl.load(V + b * sv_b + h * sv_h + t64 * sv_t + offs_d * sv_d, mask=d_ok, other=0.0).to(tl.float32)
        k_acc = g * k_acc + (1.0 - g) * k
        v_acc = g * v_acc + (1.0 - g) * v
        row = (bh * T + t64) * D + offs_d
        tl.store(KS + row, k_acc, mask=d_ok)
        tl.store(VS + row, v_acc, mask=d_ok)


@triton.jit
def _softmax_over_summaries(acc, m_i, l_i, q, q_chunk, K, V, s_n, s_d, n_keys, first_key_chunk, qk_scale,
                            offs_d, d_ok, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) with summary keys [0, n_keys) of K/V (already offset to the
    batch and head).  Key j belongs to chunk first_key_chunk + j; query row r sees it iff that chunk is strictly
    before its own, q_chunk[r].  Prefix keys get negative chunk numbers: every query sees them."""
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_keys
        kv_off = offs_n[:, None] * s_n + offs_d[None, :] * s_d
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = ((first_key_chunk + offs_n)[None, :] < q_chunk[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # m_i is finite (the own term), so m_new is too
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@autotune(configs=_ATTN_CONFIGS, key=["D", "L"], lean=_LEAN)
@triton.jit(do_not_specialize=["T"])
def _attn_fwd_kernel(Q, KS, VS, PK, PV, O, LSE,
                     sq_b, sq_t, sq_h, sq_d, so_b, so_t, so_h, so_d, sp_b, sp_h, sp_n, sp_d,
                     T, H, D, L, P, qk_scale,
                     BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """o and lse (base 2) for a block of queries, from the scanned k/v (B, H, T, D) and the prefix."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    tile_mask = (rows < T)[:, None] & d_ok[None, :]
    local = tl.arange(0, BLOCK_M)[:, None]
    q = tl.load(Q + b * sq_b + h * sq_h + m0.to(tl.int64) * sq_t + local * sq_t + offs_d[None, :] * sq_d,
                mask=tile_mask, other=0.0).to(tl.float32)
    scanned = (bh * T + rows)[:, None] * D + offs_d[None, :]
    k_run = tl.load(KS + scanned, mask=tile_mask, other=0.0)
    v_run = tl.load(VS + scanned, mask=tile_mask, other=0.0)

    # The current-token term opens the softmax: max = its logit, sum = 1, accumulator = its value.
    m_i = tl.sum(q * k_run, 1) * qk_scale
    l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    acc = v_run
    q_chunk = rows // L
    acc, m_i, l_i = _softmax_over_summaries(acc, m_i, l_i, q, q_chunk, PK + b * sp_b + h * sp_h,
                                            PV + b * sp_b + h * sp_h, sp_n, sp_d, P, -P, qk_scale,
                                            offs_d, d_ok, BLOCK_N, PRECISION)
    # This segment's summaries: chunk c's is row c*L + L - 1 of the scanned k/v.  Only chunks before the
    # block's last query's chunk can be visible.
    n_visible = (tl.minimum(m0 + BLOCK_M, T) - 1) // L
    summary0 = bh * T * D + (L - 1) * D
    acc, m_i, l_i = _softmax_over_summaries(acc, m_i, l_i, q, q_chunk, KS + summary0, VS + summary0, L * D, 1,
                                            n_visible, 0, qk_scale, offs_d, d_ok, BLOCK_N, PRECISION)

    o = acc / l_i[:, None]
    tl.store(O + b * so_b + h * so_h + m0.to(tl.int64) * so_t + local * so_t + offs_d[None, :] * so_d,
             round_to(o, O.dtype.element_ty), mask=tile_mask)
    tl.store(LSE + bh * T + rows, m_i + tl.log2(l_i), mask=rows < T)


# ---------------------------------------------------------------------------------------------- backward
@triton.jit
def _dq_over_summaries(dq, q, do, lse, delta, q_chunk, K, V, s_n, s_d, n_keys, first_key_chunk, qk_scale,
                       offs_d, d_ok, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dq += dS @ K over summary keys [0, n_keys) (same visibility rule as `_softmax_over_summaries`); the
    caller multiplies by the softmax scale once at the end."""
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_keys
        kv_off = offs_n[:, None] * s_n + offs_d[None, :] * s_d
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = ((first_key_chunk + offs_n)[None, :] < q_chunk[:, None]) & n_ok[None, :]
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, k, input_precision=PRECISION)
    return dq


@autotune(configs=_ATTN_CONFIGS, key=["D", "L"], lean=_LEAN, prune_configs_by={"early_config_prune": _prune_backward})
@triton.jit(do_not_specialize=["T"])
def _attn_bwd_dq_kernel(Q, DO, O, KS, VS, PK, PV, LSE, DELTA, DQ,
                        sq_b, sq_t, sq_h, sq_d, sdo_b, sdo_t, sdo_h, sdo_d, so_b, so_t, so_h, so_d,
                        sdq_b, sdq_t, sdq_h, sdq_d, sp_b, sp_h, sp_n, sp_d,
                        T, H, D, L, P, qk_scale, scale,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """dq for a block of queries; also writes delta = rowsum(dO * O), which the other backward kernels read."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    tile_mask = row_ok[:, None] & d_ok[None, :]
    local = tl.arange(0, BLOCK_M)[:, None]
    m064 = m0.to(tl.int64)
    q = tl.load(Q + b * sq_b + h * sq_h + m064 * sq_t + local * sq_t + offs_d[None, :] * sq_d,
                mask=tile_mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdo_b + h * sdo_h + m064 * sdo_t + local * sdo_t + offs_d[None, :] * sdo_d,
                 mask=tile_mask, other=0.0).to(tl.float32)
    o = tl.load(O + b * so_b + h * so_h + m064 * so_t + local * so_t + offs_d[None, :] * so_d,
                mask=tile_mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)
    delta = tl.sum(do * o, 1)
    tl.store(DELTA + bh * T + rows, delta, mask=row_ok)

    scanned = (bh * T + rows)[:, None] * D + offs_d[None, :]
    k_run = tl.load(KS + scanned, mask=tile_mask, other=0.0)
    v_run = tl.load(VS + scanned, mask=tile_mask, other=0.0)
    p_own = tl.exp2(tl.sum(q * k_run, 1) * qk_scale - lse)
    ds_own = p_own * (tl.sum(do * v_run, 1) - delta)
    dq = ds_own[:, None] * k_run

    q_chunk = rows // L
    dq = _dq_over_summaries(dq, q, do, lse, delta, q_chunk, PK + b * sp_b + h * sp_h, PV + b * sp_b + h * sp_h,
                            sp_n, sp_d, P, -P, qk_scale, offs_d, d_ok, BLOCK_N, PRECISION)
    n_visible = (tl.minimum(m0 + BLOCK_M, T) - 1) // L
    summary0 = bh * T * D + (L - 1) * D
    dq = _dq_over_summaries(dq, q, do, lse, delta, q_chunk, KS + summary0, VS + summary0, L * D, 1, n_visible, 0,
                            qk_scale, offs_d, d_ok, BLOCK_N, PRECISION)
    tl.store(DQ + b * sdq_b + h * sdq_h + m064 * sdq_t + local * sdq_t + offs_d[None, :] * sdq_d,
             round_to(dq * scale, DQ.dtype.element_ty), mask=tile_mask)


@autotune(configs=_ATTN_CONFIGS, key=["D", "L"], lean=_LEAN, prune_configs_by={"early_config_prune": _prune_backward})
@triton.jit(do_not_specialize=["T"])
def _attn_bwd_dsummary_kernel(Q, DO, LSE, DELTA, K, V, DK, DV,
                              sq_b, sq_t, sq_h, sq_d, sdo_b, sdo_t, sdo_h, sdo_d,
                              sk_b, sk_h, sk_n, sk_d, sdk_b, sdk_h, sdk_n, sdk_d,
                              T, H, D, L, n_keys, first_key_chunk, qk_scale, scale,
                              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr):
    """Gradients of a block of summary keys/values (B, H, N, D views; key j is chunk first_key_chunk + j),
    summed over every query that sees them.  Works for the prefix (negative chunks) and in-segment summaries."""
    n0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_keys
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d,
                mask=kv_mask, other=0.0).to(tl.float32)
    v = tl.load(V + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d,
                mask=kv_mask, other=0.0).to(tl.float32)
    key_chunk = first_key_chunk + offs_n
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Queries before the chunk after this block's first key see none of its keys: start at that chunk.
    first_query = tl.maximum((first_key_chunk + n0 + 1) * L, 0)
    start = (first_query // BLOCK_M) * BLOCK_M
    m064 = start.to(tl.int64)  # tracks m0 as an int64 tensor, for pointer offsets into long sequences
    local = tl.arange(0, BLOCK_M)[:, None]
    for m0 in range(start, T, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        tile_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sq_b + h * sq_h + m064 * sq_t + local * sq_t + offs_d[None, :] * sq_d,
                    mask=tile_mask, other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdo_b + h * sdo_h + m064 * sdo_t + local * sdo_t + offs_d[None, :] * sdo_d,
                     mask=tile_mask, other=0.0).to(tl.float32)
        lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * T + rows, mask=row_ok, other=0.0)
        # Transposed scores (keys x queries), so the key gradients come out of plain dots.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        visible = (key_chunk[:, None] < (rows // L)[None, :]) & row_ok[None, :] & n_ok[:, None]
        p_t = tl.where(visible, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t, do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dk += tl.dot(p_t * (dp_t - delta[None, :]), q, input_precision=PRECISION)
        m064 += BLOCK_M

    out = b * sdk_b + h * sdk_h + offs_n[:, None] * sdk_n + offs_d[None, :] * sdk_d
    tl.store(DK + out, round_to(dk * scale, DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, round_to(dv, DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _lanes_if(offs_d, D, cond):
    """The lanes offs_d < D if the scalar `cond` holds, else none.  (Not `offs_d < D & cond`: the interpreter
    turns a block-and-scalar `&` into int32, which it then rejects as a mask.)"""
    return offs_d < tl.where(cond, D, 0)


@triton.jit(do_not_specialize=["T"])
def _scan_bwd_kernel(Q, K, V, G, DO, KS, VS, LSE, DELTA, DSK, DSV, DK, DV, DG,
                     sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d,
                     sg_b, sg_t, sg_h, sg_d, sdo_b, sdo_t, sdo_h, sdo_d, sx_b, sx_t, sx_h, sx_d,
                     T, H, D, L, n_summaries, qk_scale, scale, BLOCK_D: tl.constexpr):
    """One program per (chunk, batch*head), walking the chunk backwards.  DSK/DSV (B, H, n_summaries, D) hold
    the summary gradients; DK, DV, DG share the strides sx_*."""
    c = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_start = c * L
    row_end = tl.minimum(row_start + L, T)

    # The chunk's summary is its last k~, v~: its gradient seeds the adjoint (a partial last chunk has none).
    has_summary = _lanes_if(offs_d, D, c < n_summaries)
    k_acc = tl.load(DSK + (bh * n_summaries + c) * D + offs_d, mask=has_summary, other=0.0)
    v_acc = tl.load(DSV + (bh * n_summaries + c) * D + offs_d, mask=has_summary, other=0.0)
    g_next = tl.full([BLOCK_D], 1.0, dtype=tl.float32)  # carries the seed into the last row unchanged
    k_cur = tl.load(KS + (bh * T + row_end - 1) * D + offs_d, mask=d_ok, other=0.0)
    v_cur = tl.load(VS + (bh * T + row_end - 1) * D + offs_d, mask=d_ok, other=0.0)
    for i in range(0, row_end - row_start):
        t64 = row_end - 1 - i
        q = tl.load(Q + b * sq_b + h * sq_h + t64 * sq_t + offs_d * sq_d, mask=d_ok, other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdo_b + h * sdo_h + t64 * sdo_t + offs_d * sdo_d, mask=d_ok,
                     other=0.0).to(tl.float32)
        k = tl.load(K + b * sk_b + h * sk_h + t64 * sk_t + offs_d * sk_d, mask=d_ok, other=0.0).to(tl.float32)
        v = tl.load(V + b * sv_b + h * sv_h + t64 * sv_t + offs_d * sv_d, mask=d_ok, other=0.0).to(tl.float32)
        g = tl.load(G + b * sg_b + h * sg_h + t64 * sg_t + offs_d * sg_d, mask=d_ok, other=0.0).to(tl.float32)
        # k~_{t-1}, v~_{t-1}: zero before the chunk's first token (the recurrence restarts there).
        prev_ok = _lanes_if(offs_d, D, t64 > row_start)
        k_prev = tl.load(KS + (bh * T + t64 - 1) * D + offs_d, mask=prev_ok, other=0.0)
        v_prev = tl.load(VS + (bh * T + t64 - 1) * D + offs_d, mask=prev_ok, other=0.0)

        # The current-token term's gradients w.r.t. k~_t, v~_t.
        lse = tl.load(LSE + bh * T + t64)
        delta = tl.load(DELTA + bh * T + t64)
        p_own = tl.exp2(tl.sum(q * k_cur, 0) * qk_scale - lse)
        ds_own = p_own * (tl.sum(do * v_cur, 0) - delta)
        k_acc = ds_own * scale * q + g_next * k_acc
        v_acc = p_own * do + g_next * v_acc

        out = b * sx_b + h * sx_h + t64 * sx_t + offs_d * sx_d
        tl.store(DK + out, round_to((1.0 - g) * k_acc, DK.dtype.element_ty), mask=d_ok)
        tl.store(DV + out, round_to((1.0 - g) * v_acc, DV.dtype.element_ty), mask=d_ok)
        tl.store(DG + out, round_to(k_acc * (k_prev - k) + v_acc * (v_prev - v), DG.dtype.element_ty), mask=d_ok)
        g_next, k_cur, v_cur = g, k_prev, v_prev


# ---------------------------------------------------------------------------------------------- wrapper
def _bhnd(x: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a (B, N, H, D) tensor in (b, h, n, d) order, the order the summary kernels take."""
    return x.stride(0), x.stride(2), x.stride(1), x.stride(3)


def _launch_shape(q: torch.Tensor, chunk_size: int) -> dict:
    b, t, h, d = q.shape
    return {"T": t, "H": h, "D": d, "L": chunk_size, "BLOCK_D": padded_width(d),
            "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32"}


def _prefix_or_dummy(prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None, fallback: torch.Tensor):
    """The prefix as (k, v, strides, P) with k and v sharing strides; an unread stand-in when there is none."""
    if prefix_k is None or prefix_k.shape[1] == 0:
        return fallback, fallback, (0, 0, 0, 0), 0
    if prefix_k.stride() != prefix_v.stride():
        prefix_k, prefix_v = prefix_k.contiguous(), prefix_v.contiguous()
    return prefix_k, prefix_v, _bhnd(prefix_k), prefix_k.shape[1]


class _TritonRat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, prefix_k, prefix_v, chunk_size: int, scale: float):
        b, t, h, d = q.shape
        shape = _launch_shape(q, chunk_size)
        n_chunks = triton.cdiv(t, chunk_size)
        k_scan = output_buffer((b, h, t, d), torch.float32, q.device)
        v_scan = output_buffer((b, h, t, d), torch.float32, q.device)
        _scan_fwd_kernel[(n_chunks, b * h)](k, v, gate, k_scan, v_scan, *k.stride(), *v.stride(), *gate.stride(),
                                            t, h, d, chunk_size, BLOCK_D=shape["BLOCK_D"],
                                            num_warps=1 if d <= 64 else 2)
        o = output_buffer((b, t, h, d), q.dtype, q.device)
        lse = output_buffer((b, h, t), torch.float32, q.device)
        pk, pv, sp, n_prefix = _prefix_or_dummy(prefix_k, prefix_v, k_scan)
        grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * h)  # noqa: E731
        _attn_fwd_kernel[grid](q, k_scan, v_scan, pk, pv, o, lse, *q.stride(), *o.stride(), *sp,
                               P=n_prefix, qk_scale=scale * LOG2E, **shape)
        ctx.save_for_backward(q, k, v, gate, prefix_k, prefix_v, k_scan, v_scan, o, lse)
        ctx.chunk_size, ctx.scale = chunk_size, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, gate, prefix_k, prefix_v, k_scan, v_scan, o, lse = ctx.saved_tensors
        chunk_size, scale = ctx.chunk_size, ctx.scale
        b, t, h, d = q.shape
        shape = _launch_shape(q, chunk_size)
        qk_scale = scale * LOG2E
        pk, pv, sp, n_prefix = _prefix_or_dummy(prefix_k, prefix_v, k_scan)
        n_summaries = (t - 1) // chunk_size  # chunks some later query sees; a partial last chunk never is

        dq = output_buffer((b, t, h, d), q.dtype, q.device)
        delta = output_buffer((b, h, t), torch.float32, q.device)
        grid_q = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * h)  # noqa: E731
        _attn_bwd_dq_kernel[grid_q](q, do, o, k_scan, v_scan, pk, pv, lse, delta, dq,
                                    *q.stride(), *do.stride(), *o.stride(), *dq.stride(), *sp,
                                    P=n_prefix, qk_scale=qk_scale, scale=scale, **shape)

        def summary_grads(keys, values, strides, n_keys, first_key_chunk, dkeys, dvalues, dstrides):
            if n_keys == 0:
                return
            grid = lambda meta: (triton.cdiv(n_keys, meta["BLOCK_N"]), b * h)  # noqa: E731
            _attn_bwd_dsummary_kernel[grid](q, do, lse, delta, keys, values, dkeys, dvalues,
                                            *q.stride(), *do.stride(), *strides, *dstrides,
                                            n_keys=n_keys, first_key_chunk=first_key_chunk, qk_scale=qk_scale,
                                            scale=scale, **shape)

        # In-segment summaries: every L-th row of the scanned k/v, as a (B, N, H, D) view.  Their gradients go
        # to (B, H, N, D) fp32 buffers, which seed the backward scan.
        dsk = output_buffer((b, h, max(n_summaries, 1), d), torch.float32, q.device)
        dsv = output_buffer((b, h, max(n_summaries, 1), d), torch.float32, q.device)
        summary_k = k_scan.transpose(1, 2)[:, chunk_size - 1::chunk_size][:, :n_summaries]
        summary_v = v_scan.transpose(1, 2)[:, chunk_size - 1::chunk_size][:, :n_summaries]
        summary_grads(summary_k, summary_v, _bhnd(summary_k), n_summaries, 0, dsk, dsv, dsk.stride())

        d_prefix_k = d_prefix_v = None
        if n_prefix and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5]):
            d_prefix_k = output_buffer(pk.shape, prefix_k.dtype, q.device)
            d_prefix_v = output_buffer(pv.shape, prefix_v.dtype, q.device)
            summary_grads(pk, pv, sp, n_prefix, -n_prefix, d_prefix_k, d_prefix_v, _bhnd(d_prefix_k))
        elif prefix_k is not None and prefix_k.shape[1] == 0:
            d_prefix_k, d_prefix_v = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)

        dk = output_buffer((b, t, h, d), k.dtype, q.device)
        dv = output_buffer((b, t, h, d), v.dtype, q.device)
        dg = output_buffer((b, t, h, d), gate.dtype, q.device)  # fresh tensors of one shape: dk, dv, dg share strides
        _scan_bwd_kernel[(triton.cdiv(t, chunk_size), b * h)](
            q, k, v, gate, do, k_scan, v_scan, lse, delta, dsk, dsv, dk, dv, dg,
            *q.stride(), *k.stride(), *v.stride(), *gate.stride(), *do.stride(), *dk.stride(),
            t, h, d, chunk_size, n_summaries, qk_scale, scale, BLOCK_D=shape["BLOCK_D"],
            num_warps=1 if d <= 64 else 2)
        return dq, dk, dv, dg, d_prefix_k, d_prefix_v, None, None


def triton_rat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, chunk_size: int,
                         scale: float | None = None,
                         prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """RAT on Triton: q, k, v, gate (B, T, H, d) -> (B, T, H, d) in q's dtype; `prefix` = (k, v) summaries
    (B, P, H, d) of earlier chunks (see `rat_attention`).  fp32/bf16/fp16, any strides."""
    require_triton(q, k, v, gate)
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"backend='triton' computes in fp32 and takes fp32/bf16/fp16 inputs, not {q.dtype}")
    if v.shape != q.shape:
        raise ValueError("backend='triton' needs v with the same head dim as q and k")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    prefix_k, prefix_v = (None, None) if prefix is None else prefix
    if prefix_k is not None and (prefix_k.shape != prefix_v.shape or prefix_k.shape[0] != q.shape[0]
                                 or prefix_k.shape[2:] != q.shape[2:]):
        raise ValueError(f"prefix summaries must be (B, P, H, d) matching q; got k{tuple(prefix_k.shape)} "
                         f"v{tuple(prefix_v.shape)}")
    return _TritonRat.apply(q, k, v, gate, prefix_k, prefix_v, chunk_size, float(scale))
