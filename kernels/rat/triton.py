"""RAT on Triton, forward and backward.

Same op as `chunk.py` (see `rat_attention` for the math).  Only the T/L chunk summaries are ever stored: every
kernel that needs a token's own scanned key/value recomputes it from k, v and the gate, with a parallel scan
(`tl.associative_scan`) over a tile that holds whole chunks.  Five kernels:

1. summaries (grid: heads x chunk blocks): scan, keep each full chunk's last k~, v~ (fp32, unrotated).
2. attention (grid: heads x query blocks, the blocks that see the most summaries first): the online softmax
   opens with the query's own term (a finite logit, so no row ever holds only -inf), then folds in the prefix
   summaries (seen by every query) and this segment's summaries of earlier chunks.  Writes o and the row lse.
3. dq (same grid): also writes delta = rowsum(dO * O).
4. summary gradients (grid: heads x key blocks, the keys seen by the most queries first): dk, dv of a block of
   summary keys (prefix or in-segment), looping over the queries that see them.
5. backward scan (grid: heads x chunk blocks): adds the own term's gradients and the summary gradients (at each
   chunk's last row), runs the adjoint recurrence as a reverse scan
       acc_t = dk~_t + g_{t+1} * acc_{t+1},   dk_t = (1 - g_t) * acc_t,   dg_t = acc_t * (k~_{t-1} - k_t) (+ v's)
   where k~_{t-1} comes from a second scan over the inputs shifted by one row (never a division by g).

Tiles and RoPE.  A tile's rows hold whole chunks: chunk c of a block sits in rows padded to L_PAD (L rounded up
to a power of two), so a scan never crosses a tile and chunk sizes up to 128 work.  Every [rows, d] tile is kept as
two [rows, d/2] halves: RoPE rotates the pairs (x_i, x_{i+d/2}) (queries by their chunk, summary keys by theirs,
gradients back by the inverse), which on halves is elementwise.  A query and its own scanned key share the angle,
so the own logit is the plain q . k~.

Precision.  16-bit inputs: the dots take bf16/fp16 operands (rotated queries and keys, probabilities, values,
dO: tensor cores) and accumulate in fp32; the scans, softmax statistics and summaries stay fp32.  fp32 inputs use
exact fp32 (IEEE) dots.  Logits are base 2 (exp2 is the native instruction), so the saved lse is log2-sum-exp2 of
scale*log2(e)*q.k, which only these kernels read.  16-bit values go through `round_to` (round to nearest even,
also under the interpreter, which would otherwise truncate).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hylo.kernels.dispatch import TRITON_DTYPES
from hylo.kernels.rat.chunk import rotate_by_chunk
from hylo.kernels.rope import rope_table
from hylo.kernels.triton_dots import dot, round_to
from hylo.kernels.triton_support import (
    autotune,
    device_shared_memory_kb,
    interpreting,
    kernel_op,
    output_buffer,
    padded_width,
    require_triton,
    traceable,
)

LOG2E = math.log2(math.e)
MAX_CHUNK = 128

# The first config is what the CPU interpreter runs (for chunks up to 16 tokens): small blocks, so that tiny test
# shapes still span several query and key blocks.  On a GPU the autotuner benchmarks the others.  Eight warps for
# 64-row tiles: a tile holds the query, the own scan's k, v and gate and two fp32 accumulators as pairs of halves,
# and at four warps every 64- and 128-row tile spilled 0.5-3.7 KB on sm_90 (bench/kernel_report.py, d = 128, bf16);
# at eight the forward and the summary gradients compile spill-free on sm_90 and the dq kernel spills 292 B where it
# spilled 2.8 KB.  32x32 w8 is spill-free for all three on sm_90 and sm_80.  A 128-row tile stays for 128-token
# chunks (a tile holds whole chunks), spilling as before.
_ATTN_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
]
# HYLO_AUTOTUNE=lean: 64x32 w8, 32x32 w8 (spill-free) and 128x32 w8 (the only tile for 128-token chunks).
_LEAN = (1, 3, 5)
_TUNE_KEY = ["HALF", "L_PAD", "ROPE"]


def _prune(configs, named_args, **kwargs):
    """A query block holds whole chunks (BLOCK_M >= L_PAD).  Configs that cannot launch (shared memory) or would
    spill heavily are skipped rather than compiled; the sizes are bench/kernel_report.py's at d = 128:
    bf16 128 x 64 backward tiles need 256-321 KB (over any GPU's limit), 128 x 32 summary gradients 177 KB (over an
    A100's 163 KB); fp32 tiles above 32 x 32 spill (64 x 32 summary gradients: 17 KB at eight warps) or need
    144-321 KB."""
    l_pad = kwargs.get("L_PAD", named_args.get("L_PAD", 1))
    half = kwargs.get("HALF", named_args.get("HALF", 0))
    smem = device_shared_memory_kb()
    small_smem = smem is not None and smem < 200
    area = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]  # noqa: E731
    kept = [c for c in configs if c.kwargs["BLOCK_M"] >= l_pad]
    if half >= 64:
        if named_args["Q"].dtype == torch.float32:
            kept = [c for c in kept if area(c) <= (16 * 16 if small_smem else 32 * 32)] or kept[:1]
        else:
            kept = [c for c in kept if area(c) < (128 * 32 if small_smem else 128 * 64)] or kept[:1]
    return kept


_PRUNE = {"early_config_prune": _prune}


# ---------------------------------------------------------------------------------------------- helpers
@triton.jit
def _chunk_rows(block, L, T, ROWS: tl.constexpr, L_PAD: tl.constexpr):
    """The tokens of a tile of ROWS rows holding chunks block*ROWS/L_PAD, ...: chunk c's token i sits in row
    (c mod ROWS/L_PAD)*L_PAD + i.  Returns each row's chunk (int64), offset in its chunk, token and validity."""
    i = tl.arange(0, ROWS)
    offset = i % L_PAD
    chunk = (i // L_PAD + block * (ROWS // L_PAD)).to(tl.int64)  # chunk counts fit int32, tokens may not
    token = chunk * L + offset
    return chunk, offset, token, (offset < L) & (token < T)


@triton.jit
def _load_halves(ptr, row_offsets, row_ok, s_d, HALF, HALF_PAD: tl.constexpr):
    """x[row, :d/2] and x[row, d/2:] as two fp32 [rows, HALF_PAD] tiles (zero outside)."""
    offs_h = tl.arange(0, HALF_PAD)
    mask = row_ok[:, None] & (offs_h < HALF)[None, :]
    p = ptr + row_offsets[:, None] + offs_h[None, :] * s_d
    return (tl.load(p, mask=mask, other=0.0).to(tl.float32),
            tl.load(p + HALF * s_d, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _store_halves(ptr, row_offsets, row_ok, s_d, x1, x2, HALF, HALF_PAD: tl.constexpr):
    offs_h = tl.arange(0, HALF_PAD)
    mask = row_ok[:, None] & (offs_h < HALF)[None, :]
    p = ptr + row_offsets[:, None] + offs_h[None, :] * s_d
    tl.store(p, round_to(x1, ptr.dtype.element_ty), mask=mask)
    tl.store(p + HALF * s_d, round_to(x2, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate(x1, x2, COS, SIN, position, row_ok, HALF, HALF_PAD: tl.constexpr, INVERSE: tl.constexpr):
    """RoPE on halves: rows turned by the angles of `position` (a row of the COS/SIN tables), or back."""
    offs_h = tl.arange(0, HALF_PAD)
    mask = row_ok[:, None] & (offs_h < HALF)[None, :]
    table = position[:, None] * HALF + offs_h[None, :]
    cos = tl.load(COS + table, mask=mask, other=1.0)
    sin = tl.load(SIN + table, mask=mask, other=0.0)
    if INVERSE:
        sin = -sin
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _linear(a1, k1, v1, a2, k2, v2):
    """Composes x -> a1*x + b1 then x -> a2*x + b2 for two recurrences (k and v) sharing the coefficient a."""
    return a1 * a2, a2 * k1 + k2, a2 * v1 + v2


@triton.jit
def _scan(restart, g, k, v):
    """k~_t = g_t k~_{t-1} + (1 - g_t) k_t (and v~) down the rows, starting afresh on rows where `restart`."""
    a = tl.where(restart[:, None], 0.0, g)
    _, k_scan, v_scan = tl.associative_scan((a, (1.0 - g) * k, (1.0 - g) * v), 0, _linear)
    return k_scan, v_scan


# ---------------------------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["T", "P"])
def _summary_kernel(K, V, G, COS, SIN, SK, SV,
                    sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d, sg_b, sg_t, sg_h, sg_d, ss_b, ss_n, ss_h,
                    T, H, HALF, L, P,
                    HALF_PAD: tl.constexpr, L_PAD: tl.constexpr, ROPE: tl.constexpr, ROWS: tl.constexpr):
    """The last k~, v~ of every full chunk into SK, SV (B, N, H, d; unit stride in d), in the dots' dtype, keys
    already rotated by their (global) chunk: the attention loops then only load them."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    chunk, offset, token, ok = _chunk_rows(tl.program_id(1), L, T, ROWS, L_PAD)
    k1, k2 = _load_halves(K + b * sk_b + h * sk_h, token * sk_t, ok, sk_d, HALF, HALF_PAD)
    v1, v2 = _load_halves(V + b * sv_b + h * sv_h, token * sv_t, ok, sv_d, HALF, HALF_PAD)
    g1, g2 = _load_halves(G + b * sg_b + h * sg_h, token * sg_t, ok, sg_d, HALF, HALF_PAD)
    ks1, vs1 = _scan(offset == 0, g1, k1, v1)
    ks2, vs2 = _scan(offset == 0, g2, k2, v2)
    last = ok & (offset == L - 1)
    if ROPE:
        ks1, ks2 = _rotate(ks1, ks2, COS, SIN, P + chunk, last, HALF, HALF_PAD, False)
    rows = b * ss_b + h * ss_h + chunk * ss_n
    _store_halves(SK, rows, last, 1, ks1, ks2, HALF, HALF_PAD)
    _store_halves(SV, rows, last, 1, vs1, vs2, HALF, HALF_PAD)


@triton.jit
def _own_term(Q, K, V, G, b, h, token, offset, ok, sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d,
              sv_b, sv_t, sv_h, sv_d, sg_b, sg_t, sg_h, sg_d, HALF, HALF_PAD: tl.constexpr):
    """q (fp32 halves) and each query's own scanned key and value, recomputed from k, v and the gate."""
    q1, q2 = _load_halves(Q + b * sq_b + h * sq_h, token * sq_t, ok, sq_d, HALF, HALF_PAD)
    k1, k2 = _load_halves(K + b * sk_b + h * sk_h, token * sk_t, ok, sk_d, HALF, HALF_PAD)
    v1, v2 = _load_halves(V + b * sv_b + h * sv_h, token * sv_t, ok, sv_d, HALF, HALF_PAD)
    g1, g2 = _load_halves(G + b * sg_b + h * sg_h, token * sg_t, ok, sg_d, HALF, HALF_PAD)
    ks1, vs1 = _scan(offset == 0, g1, k1, v1)
    ks2, vs2 = _scan(offset == 0, g2, k2, v2)
    return q1, q2, ks1, ks2, vs1, vs2


@triton.jit
def _summary_tile(K, V, s_n, s_d, start, n_keys, key_chunk0, HALF, HALF_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Summary keys (already rotated) and values [start, start + BLOCK_N), halves in their stored dtype."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_keys
    mask = n_ok[:, None] & (tl.arange(0, HALF_PAD) < HALF)[None, :]
    p = offs_n.to(tl.int64)[:, None] * s_n + tl.arange(0, HALF_PAD)[None, :] * s_d
    k1 = tl.load(K + p, mask=mask, other=0.0)
    k2 = tl.load(K + p + HALF * s_d, mask=mask, other=0.0)
    v1 = tl.load(V + p, mask=mask, other=0.0)
    v2 = tl.load(V + p + HALF * s_d, mask=mask, other=0.0)
    return k1, k2, v1, v2, key_chunk0 + offs_n, n_ok


@triton.jit
def _softmax_over_summaries(acc1, acc2, m_i, l_i, q1, q2, q_chunk, K, V, s_n, s_d, n_keys, key_chunk0, qk_scale,
                            HALF, HALF_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update with summary keys [0, n_keys) of K/V (offset to the batch and head); key j is chunk
    key_chunk0 + j and query row r sees it iff that is before q_chunk[r] (both global chunk numbers)."""
    for start in range(0, n_keys, BLOCK_N):
        k1, k2, v1, v2, key_chunk, n_ok = _summary_tile(K, V, s_n, s_d, start, n_keys, key_chunk0, HALF, HALF_PAD,
                                                        BLOCK_N)
        s = dot(q2, tl.trans(k2), dot(q1, tl.trans(k1))) * qk_scale
        s = tl.where((key_chunk[None, :] < q_chunk[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # m_i is finite (the own term), so m_new is too
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = round_to(p, q1.dtype)
        acc1 = dot(p, v1, acc1 * alpha[:, None])
        acc2 = dot(p, v2, acc2 * alpha[:, None])
        m_i = m_new
    return acc1, acc2, m_i, l_i


@autotune(configs=_ATTN_CONFIGS, key=_TUNE_KEY, lean=_LEAN, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["T", "P", "N_KEYS"])
def _attn_fwd_kernel(Q, K, V, G, SK, SV, PK, PV, COS, SIN, O, LSE,
                     sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d,
                     sg_b, sg_t, sg_h, sg_d, so_b, so_t, so_h, so_d, ss_b, ss_n, ss_h, sp_b, sp_n, sp_h, sp_d,
                     T, H, HALF, L, P, N_KEYS, qk_scale,
                     HALF_PAD: tl.constexpr, L_PAD: tl.constexpr, ROPE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """o and lse (base 2) for a block of queries."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    block = tl.num_programs(1) - 1 - tl.program_id(1)  # later blocks see more summaries: start them first
    chunk, offset, token, ok = _chunk_rows(block, L, T, BLOCK_M, L_PAD)
    q1, q2, ks1, ks2, vs1, vs2 = _own_term(Q, K, V, G, b, h, token, offset, ok, sq_b, sq_t, sq_h, sq_d,
                                           sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d, sg_b, sg_t, sg_h, sg_d,
                                           HALF, HALF_PAD)
    # The own term opens the softmax: max = its logit, sum = 1, accumulator = its value.
    m_i = (tl.sum(q1 * ks1, 1) + tl.sum(q2 * ks2, 1)) * qk_scale
    l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    q_chunk = P + chunk
    if ROPE:
        q1, q2 = _rotate(q1, q2, COS, SIN, q_chunk, ok, HALF, HALF_PAD, False)
    DT: tl.constexpr = O.dtype.element_ty
    q1, q2 = round_to(q1, DT), round_to(q2, DT)
    acc1, acc2, m_i, l_i = _softmax_over_summaries(vs1, vs2, m_i, l_i, q1, q2, q_chunk, PK + b * sp_b + h * sp_h,
                                                   PV + b * sp_b + h * sp_h, sp_n, sp_d, P, 0, qk_scale,
                                                   HALF, HALF_PAD, BLOCK_N)
    # This segment's summaries: only chunks before the block's last chunk can be visible.
    n_visible = tl.minimum((block + 1) * (BLOCK_M // L_PAD) - 1, N_KEYS)
    acc1, acc2, m_i, l_i = _softmax_over_summaries(acc1, acc2, m_i, l_i, q1, q2, q_chunk,
                                                   SK + b * ss_b + h * ss_h, SV + b * ss_b + h * ss_h, ss_n, 1,
                                                   n_visible, P, qk_scale, HALF, HALF_PAD, BLOCK_N)
    _store_halves(O + b * so_b + h * so_h, token * so_t, ok, so_d, acc1 / l_i[:, None], acc2 / l_i[:, None],
                  HALF, HALF_PAD)
    tl.store(LSE + bh * T + token, m_i + tl.log2(l_i), mask=ok)


# ---------------------------------------------------------------------------------------------- backward
@triton.jit
def _dq_over_summaries(dq1, dq2, q1, q2, do1, do2, lse, delta, q_chunk, K, V, s_n, s_d, n_keys, key_chunk0,
                       qk_scale, HALF, HALF_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq (rotated frame) += dS @ K over summary keys [0, n_keys), same visibility as the forward."""
    for start in range(0, n_keys, BLOCK_N):
        k1, k2, v1, v2, key_chunk, n_ok = _summary_tile(K, V, s_n, s_d, start, n_keys, key_chunk0, HALF, HALF_PAD,
                                                        BLOCK_N)
        s = dot(q2, tl.trans(k2), dot(q1, tl.trans(k1))) * qk_scale
        visible = (key_chunk[None, :] < q_chunk[:, None]) & n_ok[None, :]
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = dot(do2, tl.trans(v2), dot(do1, tl.trans(v1)))
        ds = round_to(p * (dp - delta[:, None]), q1.dtype)
        dq1 = dot(ds, k1, dq1)
        dq2 = dot(ds, k2, dq2)
    return dq1, dq2


@autotune(configs=_ATTN_CONFIGS, key=_TUNE_KEY, lean=_LEAN, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["T", "P", "N_KEYS"])
def _attn_bwd_dq_kernel(Q, K, V, G, DO, O, SK, SV, PK, PV, COS, SIN, LSE, DELTA, DQ,
                        sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d,
                        sg_b, sg_t, sg_h, sg_d, sdo_b, sdo_t, sdo_h, sdo_d, so_b, so_t, so_h, so_d,
                        sdq_b, sdq_t, sdq_h, sdq_d, ss_b, ss_n, ss_h, sp_b, sp_n, sp_h, sp_d,
                        T, H, HALF, L, P, N_KEYS, qk_scale, scale,
                        HALF_PAD: tl.constexpr, L_PAD: tl.constexpr, ROPE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq for a block of queries; also writes delta = rowsum(dO * O), which the other backward kernels read."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    block = tl.num_programs(1) - 1 - tl.program_id(1)
    chunk, offset, token, ok = _chunk_rows(block, L, T, BLOCK_M, L_PAD)
    q1, q2, ks1, ks2, vs1, vs2 = _own_term(Q, K, V, G, b, h, token, offset, ok, sq_b, sq_t, sq_h, sq_d,
                                           sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d, sg_b, sg_t, sg_h, sg_d,
                                           HALF, HALF_PAD)
    do1, do2 = _load_halves(DO + b * sdo_b + h * sdo_h, token * sdo_t, ok, sdo_d, HALF, HALF_PAD)
    o1, o2 = _load_halves(O + b * so_b + h * so_h, token * so_t, ok, so_d, HALF, HALF_PAD)
    lse = tl.load(LSE + bh * T + token, mask=ok, other=0.0)
    delta = tl.sum(do1 * o1, 1) + tl.sum(do2 * o2, 1)
    tl.store(DELTA + bh * T + token, delta, mask=ok)

    p_own = tl.exp2((tl.sum(q1 * ks1, 1) + tl.sum(q2 * ks2, 1)) * qk_scale - lse)
    ds_own = p_own * (tl.sum(do1 * vs1, 1) + tl.sum(do2 * vs2, 1) - delta)
    q_chunk = P + chunk
    if ROPE:
        q1, q2 = _rotate(q1, q2, COS, SIN, q_chunk, ok, HALF, HALF_PAD, False)
    DT: tl.constexpr = DO.dtype.element_ty
    q1, q2, do1, do2 = round_to(q1, DT), round_to(q2, DT), round_to(do1, DT), round_to(do2, DT)
    dq1 = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    dq1, dq2 = _dq_over_summaries(dq1, dq2, q1, q2, do1, do2, lse, delta, q_chunk, PK + b * sp_b + h * sp_h,
                                  PV + b * sp_b + h * sp_h, sp_n, sp_d, P, 0, qk_scale, HALF, HALF_PAD, BLOCK_N)
    n_visible = tl.minimum((block + 1) * (BLOCK_M // L_PAD) - 1, N_KEYS)
    dq1, dq2 = _dq_over_summaries(dq1, dq2, q1, q2, do1, do2, lse, delta, q_chunk, SK + b * ss_b + h * ss_h,
                                  SV + b * ss_b + h * ss_h, ss_n, 1, n_visible, P, qk_scale, HALF, HALF_PAD,
                                  BLOCK_N)
    if ROPE:  # back from the query's rotated frame
        dq1, dq2 = _rotate(dq1, dq2, COS, SIN, q_chunk, ok, HALF, HALF_PAD, True)
    _store_halves(DQ + b * sdq_b + h * sdq_h, token * sdq_t, ok, sdq_d, (dq1 + ds_own[:, None] * ks1) * scale,
                  (dq2 + ds_own[:, None] * ks2) * scale, HALF, HALF_PAD)


@autotune(configs=_ATTN_CONFIGS, key=_TUNE_KEY, lean=_LEAN, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["T", "P", "n_keys", "key_chunk0"])
def _attn_bwd_dsummary_kernel(Q, DO, LSE, DELTA, K, V, COS, SIN, DK, DV,
                              sq_b, sq_t, sq_h, sq_d, sdo_b, sdo_t, sdo_h, sdo_d,
                              sk_b, sk_n, sk_h, sk_d, sdk_b, sdk_n, sdk_h, sdk_d,
                              T, H, HALF, L, P, n_keys, key_chunk0, qk_scale, scale,
                              HALF_PAD: tl.constexpr, L_PAD: tl.constexpr, ROPE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Gradients of a block of summary keys/values (B, N, H, d; key j is global chunk key_chunk0 + j), summed over
    every query that sees them: the prefix (key_chunk0 = 0) or this segment's summaries (key_chunk0 = P)."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    n0 = tl.program_id(1) * BLOCK_N
    DT: tl.constexpr = DO.dtype.element_ty
    k1, k2, v1, v2, key_chunk, n_ok = _summary_tile(K + b * sk_b + h * sk_h, V + b * sk_b + h * sk_h, sk_n, sk_d,
                                                    n0, n_keys, key_chunk0, HALF, HALF_PAD, BLOCK_N)
    dk1 = tl.zeros([BLOCK_N, HALF_PAD], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF_PAD], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, HALF_PAD], dtype=tl.float32)
    dv2 = tl.zeros([BLOCK_N, HALF_PAD], dtype=tl.float32)
    # Queries of chunks up to the block's first key's chunk see none of its keys: start after it.
    first_chunk = tl.maximum(key_chunk0 + n0 + 1 - P, 0)
    n_blocks = tl.cdiv(tl.cdiv(T, L), BLOCK_M // L_PAD)
    for block in range(first_chunk // (BLOCK_M // L_PAD), n_blocks):
        chunk, offset, token, ok = _chunk_rows(block, L, T, BLOCK_M, L_PAD)
        q1, q2 = _load_halves(Q + b * sq_b + h * sq_h, token * sq_t, ok, sq_d, HALF, HALF_PAD)
        do1, do2 = _load_halves(DO + b * sdo_b + h * sdo_h, token * sdo_t, ok, sdo_d, HALF, HALF_PAD)
        lse = tl.load(LSE + bh * T + token, mask=ok, other=0.0)
        delta = tl.load(DELTA + bh * T + token, mask=ok, other=0.0)
        q_chunk = P + chunk
        if ROPE:
            q1, q2 = _rotate(q1, q2, COS, SIN, q_chunk, ok, HALF, HALF_PAD, False)
        q1, q2, do1, do2 = round_to(q1, DT), round_to(q2, DT), round_to(do1, DT), round_to(do2, DT)
        # Transposed scores (keys x queries), so the key gradients come out of plain dots.
        s_t = dot(k2, tl.trans(q2), dot(k1, tl.trans(q1))) * qk_scale
        visible = (key_chunk[:, None] < q_chunk[None, :]) & ok[None, :] & n_ok[:, None]
        p_t = tl.where(visible, tl.exp2(s_t - lse[None, :]), 0.0)
        dp_t = dot(v2, tl.trans(do2), dot(v1, tl.trans(do1)))
        ds_t = round_to(p_t * (dp_t - delta[None, :]), DT)
        p_t = round_to(p_t, DT)
        dv1 = dot(p_t, do1, dv1)
        dv2 = dot(p_t, do2, dv2)
        dk1 = dot(ds_t, q1, dk1)
        dk2 = dot(ds_t, q2, dk2)
    if ROPE:  # back from the key's rotated frame
        dk1, dk2 = _rotate(dk1, dk2, COS, SIN, key_chunk, n_ok, HALF, HALF_PAD, True)
    rows = b * sdk_b + h * sdk_h + (n0 + tl.arange(0, BLOCK_N)).to(tl.int64) * sdk_n
    _store_halves(DK, rows, n_ok, sdk_d, dk1 * scale, dk2 * scale, HALF, HALF_PAD)
    _store_halves(DV, rows, n_ok, sdk_d, dv1, dv2, HALF, HALF_PAD)


@triton.jit(do_not_specialize=["T", "N_SEEDS"])
def _scan_bwd_kernel(Q, K, V, G, DO, LSE, DELTA, DSK, DSV, DK, DV, DG,
                     sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d,
                     sg_b, sg_t, sg_h, sg_d, sdo_b, sdo_t, sdo_h, sdo_d, ss_b, ss_n, ss_h, sx_b, sx_t, sx_h, sx_d,
                     T, H, HALF, L, N_SEEDS, qk_scale, scale,
                     HALF_PAD: tl.constexpr, L_PAD: tl.constexpr, ROWS: tl.constexpr):
    """dk, dv, dg of a tile of whole chunks.  DSK/DSV (B, N, H, d) fp32 hold the summary gradients of chunks
    [0, N_SEEDS); DK, DV, DG share the strides sx_*."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    chunk, offset, token, ok = _chunk_rows(tl.program_id(1), L, T, ROWS, L_PAD)
    q1, q2, ks1, ks2, vs1, vs2 = _own_term(Q, K, V, G, b, h, token, offset, ok, sq_b, sq_t, sq_h, sq_d,
                                           sk_b, sk_t, sk_h, sk_d, sv_b, sv_t, sv_h, sv_d, sg_b, sg_t, sg_h, sg_d,
                                           HALF, HALF_PAD)
    k1, k2 = _load_halves(K + b * sk_b + h * sk_h, token * sk_t, ok, sk_d, HALF, HALF_PAD)
    v1, v2 = _load_halves(V + b * sv_b + h * sv_h, token * sv_t, ok, sv_d, HALF, HALF_PAD)
    g1, g2 = _load_halves(G + b * sg_b + h * sg_h, token * sg_t, ok, sg_d, HALF, HALF_PAD)
    # k~_{t-1}, v~_{t-1}: the same scan over the inputs one row earlier (zero at a chunk's first token).
    has_prev = ok & (offset > 0)
    kp1, kp2 = _load_halves(K + b * sk_b + h * sk_h, (token - 1) * sk_t, has_prev, sk_d, HALF, HALF_PAD)
    vp1, vp2 = _load_halves(V + b * sv_b + h * sv_h, (token - 1) * sv_t, has_prev, sv_d, HALF, HALF_PAD)
    gp1, gp2 = _load_halves(G + b * sg_b + h * sg_h, (token - 1) * sg_t, has_prev, sg_d, HALF, HALF_PAD)
    kp1, vp1 = _scan(offset == 1, gp1, kp1, vp1)
    kp2, vp2 = _scan(offset == 1, gp2, kp2, vp2)

    # The own term's gradients w.r.t. k~_t, v~_t, plus the summary gradients on each full chunk's last row.
    do1, do2 = _load_halves(DO + b * sdo_b + h * sdo_h, token * sdo_t, ok, sdo_d, HALF, HALF_PAD)
    lse = tl.load(LSE + bh * T + token, mask=ok, other=0.0)
    delta = tl.load(DELTA + bh * T + token, mask=ok, other=0.0)
    p_own = tl.exp2((tl.sum(q1 * ks1, 1) + tl.sum(q2 * ks2, 1)) * qk_scale - lse)
    ds_own = p_own * (tl.sum(do1 * vs1, 1) + tl.sum(do2 * vs2, 1) - delta) * scale
    seeded = ok & (offset == L - 1) & (chunk < N_SEEDS)
    seed = b * ss_b + h * ss_h + chunk * ss_n
    sk1, sk2 = _load_halves(DSK, seed, seeded, 1, HALF, HALF_PAD)
    sv1, sv2 = _load_halves(DSV, seed, seeded, 1, HALF, HALF_PAD)
    # The adjoint runs backwards and restarts at each chunk's last row (g_{t+1} = 0 there).
    has_next = ok & (offset < L - 1) & (token + 1 < T)
    gn1, gn2 = _load_halves(G + b * sg_b + h * sg_h, (token + 1) * sg_t, has_next, sg_d, HALF, HALF_PAD)
    _, ak1, av1 = tl.associative_scan((gn1, ds_own[:, None] * q1 + sk1, p_own[:, None] * do1 + sv1), 0, _linear,
                                      reverse=True)
    _, ak2, av2 = tl.associative_scan((gn2, ds_own[:, None] * q2 + sk2, p_own[:, None] * do2 + sv2), 0, _linear,
                                      reverse=True)
    rows = b * sx_b + h * sx_h + token * sx_t
    _store_halves(DK, rows, ok, sx_d, (1.0 - g1) * ak1, (1.0 - g2) * ak2, HALF, HALF_PAD)
    _store_halves(DV, rows, ok, sx_d, (1.0 - g1) * av1, (1.0 - g2) * av2, HALF, HALF_PAD)
    _store_halves(DG, rows, ok, sx_d, ak1 * (kp1 - k1) + av1 * (vp1 - v1), ak2 * (kp2 - k2) + av2 * (vp2 - v2),
                  HALF, HALF_PAD)


# ---------------------------------------------------------------------------------------------- wrapper
def _shape(q: torch.Tensor, chunk_size: int, rope: bool) -> dict:
    d = q.shape[-1]
    return {"H": q.shape[2], "HALF": d // 2, "L": chunk_size, "HALF_PAD": padded_width(d // 2),
            "L_PAD": triton.next_power_of_2(chunk_size), "ROPE": rope}


def _scan_rows(chunk_size: int) -> int:
    """Rows of the scan kernels' tiles: whole chunks, at least 64 on a GPU (16 under the interpreter, so that
    tiny test shapes span several tiles)."""
    return max(triton.next_power_of_2(chunk_size), 16 if interpreting() else 64)


def _prefix_or_dummy(prefix_k, prefix_v, rope_theta, q: torch.Tensor):
    """The prefix as the kernels read it: (k rotated by its chunks, v, both in q's dtype and contiguous, P); an
    unread stand-in when there is none."""
    if prefix_k is None or prefix_k.shape[1] == 0:
        return q, q, 0
    return (rotate_by_chunk(prefix_k, 0, rope_theta).to(q.dtype).contiguous(), prefix_v.to(q.dtype).contiguous(),
            prefix_k.shape[1])


def _rope_tables(n_chunks: int, d: int, rope_theta: float | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    if rope_theta is None:
        dummy = torch.zeros(1, device=device)
        return dummy, dummy
    cos, sin = rope_table(n_chunks, d, rope_theta, torch.float32, device)
    return cos.contiguous(), sin.contiguous()


# ---------------------------------------------------------------------------------------------- the ops
# Registered with torch.library (hylo::rat_forward / hylo::rat_backward) so torch.compile(fullgraph=True) takes
# them as single ops (and Inductor, through wrap_triton, sees the kernels); autograd joins them.
@kernel_op("hylo::rat_forward")
def _rat_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor,
                 prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None, chunk_size: int, scale: float,
                 rope_theta: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> o, lse (B, H, T) fp32, and the chunk summaries sk, sv (B, max(T/L, 1), H, d) in q's dtype."""
    b, t, h, d = q.shape
    shape = _shape(q, chunk_size, rope_theta is not None)
    n_chunks, n_summaries = triton.cdiv(t, chunk_size), t // chunk_size
    pk, pv, n_prefix = _prefix_or_dummy(prefix_k, prefix_v, rope_theta, q)
    cos, sin = _rope_tables(n_prefix + n_chunks, d, rope_theta, q.device)
    # The only per-sequence state kept for backward: one summary per chunk, in the dots' dtype.
    sk = output_buffer((b, max(n_summaries, 1), h, d), q.dtype, q.device)
    sv = output_buffer((b, max(n_summaries, 1), h, d), q.dtype, q.device)
    rows = _scan_rows(chunk_size)
    traceable(_summary_kernel)[(b * h, triton.cdiv(n_chunks, rows // shape["L_PAD"]))](
        k, v, gate, cos, sin, sk, sv, *k.stride(), *v.stride(), *gate.stride(), *sk.stride()[:3],
        t, h, shape["HALF"], chunk_size, n_prefix, HALF_PAD=shape["HALF_PAD"], L_PAD=shape["L_PAD"],
        ROPE=shape["ROPE"], ROWS=rows, num_warps=4)
    o = output_buffer((b, t, h, d), q.dtype, q.device)
    lse = output_buffer((b, h, t), torch.float32, q.device)
    grid = lambda meta: (b * h, triton.cdiv(n_chunks, meta["BLOCK_M"] // meta["L_PAD"]))  # noqa: E731
    traceable(_attn_fwd_kernel)[grid](q, k, v, gate, sk, sv, pk, pv, cos, sin, o, lse,
                                      *q.stride(), *k.stride(), *v.stride(), *gate.stride(), *o.stride(),
                                      *sk.stride()[:3], *pk.stride(),
                                      T=t, P=n_prefix, N_KEYS=n_summaries, qk_scale=scale * LOG2E, **shape)
    return o, lse, sk, sv


@_rat_forward.register_fake
def _(q, k, v, gate, prefix_k, prefix_v, chunk_size, scale, rope_theta):
    b, t, h, d = q.shape
    n = max(t // chunk_size, 1)
    return (q.new_empty(b, t, h, d), q.new_empty((b, h, t), dtype=torch.float32), q.new_empty(b, n, h, d),
            q.new_empty(b, n, h, d))


@kernel_op("hylo::rat_backward")
def _rat_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor,
                  prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None, o: torch.Tensor, lse: torch.Tensor,
                  sk: torch.Tensor, sv: torch.Tensor, chunk_size: int, scale: float, rope_theta: float | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv, dgate, d prefix_k, d prefix_v (the last two empty without a prefix)."""
    b, t, h, d = q.shape
    shape = _shape(q, chunk_size, rope_theta is not None)
    qk_scale = scale * LOG2E
    n_chunks = triton.cdiv(t, chunk_size)
    n_keys = (t - 1) // chunk_size  # summaries some later query sees; a partial last chunk's never is
    pk, pv, n_prefix = _prefix_or_dummy(prefix_k, prefix_v, rope_theta, q)
    cos, sin = _rope_tables(n_prefix + n_chunks, d, rope_theta, q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *gate.stride())

    dq = output_buffer((b, t, h, d), q.dtype, q.device)
    delta = output_buffer((b, h, t), torch.float32, q.device)
    grid_q = lambda meta: (b * h, triton.cdiv(n_chunks, meta["BLOCK_M"] // meta["L_PAD"]))  # noqa: E731
    traceable(_attn_bwd_dq_kernel)[grid_q](q, k, v, gate, do, o, sk, sv, pk, pv, cos, sin, lse, delta, dq,
                                           *strides, *do.stride(), *o.stride(), *dq.stride(), *sk.stride()[:3],
                                           *pk.stride(), T=t, P=n_prefix, N_KEYS=n_keys, qk_scale=qk_scale,
                                           scale=scale, **shape)

    def summary_grads(keys, values, count, key_chunk0, dkeys, dvalues):
        grid = lambda meta: (b * h, triton.cdiv(count, meta["BLOCK_N"]))  # noqa: E731
        traceable(_attn_bwd_dsummary_kernel)[grid](q, do, lse, delta, keys, values, cos, sin, dkeys, dvalues,
                                                   *q.stride(), *do.stride(), *keys.stride(), *dkeys.stride(),
                                                   T=t, P=n_prefix, n_keys=count, key_chunk0=key_chunk0,
                                                   qk_scale=qk_scale, scale=scale, **shape)

    # This segment's summary gradients (fp32, unrotated) seed the backward scan.
    dsk = output_buffer(sk.shape, torch.float32, q.device)
    dsv = output_buffer(sv.shape, torch.float32, q.device)
    if n_keys:
        summary_grads(sk, sv, n_keys, n_prefix, dsk, dsv)
    if prefix_k is None:
        d_prefix_k, d_prefix_v = q.new_empty(0), q.new_empty(0)
    else:
        d_prefix_k = output_buffer(prefix_k.shape, prefix_k.dtype, q.device)
        d_prefix_v = output_buffer(prefix_v.shape, prefix_v.dtype, q.device)
        if n_prefix:
            summary_grads(pk, pv, n_prefix, 0, d_prefix_k, d_prefix_v)

    dk = output_buffer((b, t, h, d), k.dtype, q.device)
    dv = output_buffer((b, t, h, d), v.dtype, q.device)
    dg = output_buffer((b, t, h, d), gate.dtype, q.device)  # fresh tensors of one shape: they share strides
    rows = _scan_rows(chunk_size)
    traceable(_scan_bwd_kernel)[(b * h, triton.cdiv(n_chunks, rows // shape["L_PAD"]))](
        q, k, v, gate, do, lse, delta, dsk, dsv, dk, dv, dg, *strides, *do.stride(), *dsk.stride()[:3],
        *dk.stride(), t, h, shape["HALF"], chunk_size, n_keys, qk_scale, scale,
        HALF_PAD=shape["HALF_PAD"], L_PAD=shape["L_PAD"], ROWS=rows, num_warps=8)
    return dq, dk, dv, dg, d_prefix_k, d_prefix_v


@_rat_backward.register_fake
def _(do, q, k, v, gate, prefix_k, prefix_v, o, lse, sk, sv, chunk_size, scale, rope_theta):
    prefix = [torch.empty_like(x) if x is not None else q.new_empty(0) for x in (prefix_k, prefix_v)]
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(gate), *prefix)


def _setup_context(ctx, inputs, output):
    q, k, v, gate, prefix_k, prefix_v, chunk_size, scale, rope_theta = inputs
    o, lse, sk, sv = output
    ctx.save_for_backward(q, k, v, gate, prefix_k, prefix_v, o, lse, sk, sv)
    ctx.constants = (chunk_size, scale, rope_theta)


def _backward(ctx, do, d_lse, d_sk, d_sv):
    q, k, v, gate, prefix_k, prefix_v, o, lse, sk, sv = ctx.saved_tensors
    dq, dk, dv, dg, dpk, dpv = _rat_backward(do, q, k, v, gate, prefix_k, prefix_v, o, lse, sk, sv, *ctx.constants)
    if prefix_k is None:
        dpk = dpv = None
    return dq, dk, dv, dg, dpk, dpv, None, None, None


_rat_forward.register_autograd(_backward, setup_context=_setup_context)


def triton_rat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, chunk_size: int,
                         scale: float | None = None, prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
                         rope_theta: float | None = None) -> torch.Tensor:
    """RAT on Triton: q, k, v (B, T, H, d) of one dtype (fp32/bf16/fp16), gate (B, T, H, d) of that dtype or
    fp32 -> (B, T, H, d) in q's dtype; `prefix` = (k, v) summaries (B, P, H, d) of earlier chunks and `rope_theta`
    as in `rat_attention`.  Any strides; even head dims; chunk_size <= 128."""
    require_triton(q, k, v, gate)
    if q.dtype not in TRITON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"backend='triton' takes q, k, v of one dtype among fp32/bf16/fp16, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if gate.dtype not in (q.dtype, torch.float32):
        raise ValueError(f"backend='triton' takes the gate in q's dtype or float32, not {gate.dtype}")
    if v.shape != q.shape or q.shape[-1] % 2:
        raise ValueError("backend='triton' needs v with the same head dim as q and k, and an even head dim")
    if chunk_size > MAX_CHUNK:
        raise ValueError(f"backend='triton' takes chunk_size <= {MAX_CHUNK} (a chunk must fit in one query tile), "
                         f"got {chunk_size}: use backend='chunk'")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    prefix_k, prefix_v = (None, None) if prefix is None else prefix
    if prefix_k is not None and (prefix_k.shape != prefix_v.shape or prefix_k.shape[0] != q.shape[0]
                                 or prefix_k.shape[2:] != q.shape[2:]):
        raise ValueError(f"prefix summaries must be (B, P, H, d) matching q; got k{tuple(prefix_k.shape)} "
                         f"v{tuple(prefix_v.shape)}")
    theta = None if rope_theta is None else float(rope_theta)
    return _rat_forward(q, k, v, gate, prefix_k, prefix_v, chunk_size, float(scale), theta)[0]
