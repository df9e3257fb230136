"""BASED linear attention in Triton, forward and backward, with the Taylor features made on the fly in registers.

phi(x) = [1, x c1, vec(x x^T) c2] (c1 = d^(-1/4), c2 = 1/(sqrt(2) sqrt(d))) has 1 + d + d^2 entries (273 for d = 16)
and is never written to memory.  A program owns one (batch, head) and a tile of BV value columns and scans the
sequence in blocks of BT tokens, carrying the state in registers (float32) in its three orders:

    S0 (BV), S1 (BD x BV), S2 (BD*BD x BV)   numerator state, S_n = sum_j phi_n(k_j)^T v_j
    z0 (),   z1 (BD),      z2 (BD*BD)        normaliser state, z_n = sum_j phi_n(k_j)

Order 2 is a (BD*BD, BV) tile indexed by f = a*BD + b.  Its feature tile phi_2(x) (BT, BD*BD) comes from loading x
twice with the column index repeated (x[:, f // BD] and x[:, f % BD]) and multiplying: no reshape needed.  Inside
a block the quadratic kernel (1 + s + s^2/2, s = q.k/sqrt(d)) is applied directly, causally masked.

Backward.  With y = n / m (numerator n, normaliser m incl. eps), the loss sees n and m only through
g_t = dy_t / m_t and h_t = -(dy_t . y_t) / m_t, so it is the backward of two plain linear attentions (values v with
upstream g, values 1 with upstream h).  `_dq_kernel` rescans forwards with the state; `_dkv_kernel` scans backwards
carrying the state's gradient dS, dz (seeded with d final state; what is left after the first block is
d initial state).  A program sees only BV of the value columns, and q.k-gradients contract over all of them, so dq
and dk are written as per-tile partial sums (float32, d wide) and added up afterwards; dv needs no reduction.  The
normaliser's terms (h, z) are added by the first value tile only.
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

# First config: what the CPU interpreter runs (small tiles, so tiny shapes span several blocks and value tiles).
# The order-2 state is BD*BD x BV float32 (256 x BV for d = 16), which bounds the useful tile sizes.
_CONFIGS = [
    triton.Config({"BT": 16, "BV": 16}, num_warps=4),
    triton.Config({"BT": 32, "BV": 16}, num_warps=4),
    triton.Config({"BT": 32, "BV": 32}, num_warps=4),
    triton.Config({"BT": 64, "BV": 32}, num_warps=8),
    triton.Config({"BT": 32, "BV": 64}, num_warps=8),
    triton.Config({"BT": 64, "BV": 64}, num_warps=8),
]
_MIN_BV = min(c.kwargs["BV"] for c in _CONFIGS)  # partial-sum buffers hold one slot per possible value tile


def _prune_for_float32(configs, named_args, **kwargs):
    """float32 inputs take IEEE float32 products (no tensor cores), whose operands are staged through shared memory:
    compiled for sm_90 (d = 16), only BT = BV = 16 fits an H100's 227 KB (190 KB; 32 x 16 needs 355 KB)."""
    if named_args["q_ptr"].dtype != torch.float32:
        return configs
    return [c for c in configs if c.kwargs["BT"] * c.kwargs["BV"] <= 16 * 16]


_PRUNE = {"early_config_prune": _prune_for_float32}
# HYLO_AUTOTUNE=lean: 16x16 w4 and 32x64 w8 spill least on sm_90 in bf16 (bench/kernel_report.py); every config
# spills today (the order-2 state in registers), which is issue 15's chunk-parallel rewrite.
_LEAN = (0, 4)


@triton.jit
def _rows(base, rows, st, cols, mask):
    """The tile base[rows, cols] (last dim unit stride) with zeros outside `mask`."""
    return tl.load(base + rows[:, None].to(tl.int64) * st + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _pair_factors(base, rows, st, mt, D, BD: tl.constexpr):
    """x[:, f // BD] and x[:, f % BD] as float32 (BT, BD*BD) tiles: their product is phi_2(x) / c2."""
    f = tl.arange(0, BD * BD)
    fa = f // BD
    fb = f % BD
    mask = mt[:, None] & ((fa < D) & (fb < D))[None, :]
    xa = _rows(base, rows, st, fa, mask).to(tl.float32)
    xb = _rows(base, rows, st, fb, mask).to(tl.float32)
    return xa, xb


@triton.jit
def _pair_grad(w, xa, xb, D, BD: tl.constexpr):
    """d/dx of sum_f w[:, f] x_a x_b (f = a*BD + b) -> (BT, BD): sum over f of w x_b into column a plus w x_a into
    column b, done as products with 0/1 selection matrices (exact in float32)."""
    f = tl.arange(0, BD * BD)
    rd = tl.arange(0, BD)
    sel_a = ((f // BD)[:, None] == rd[None, :]).to(tl.float32)
    sel_b = ((f % BD)[:, None] == rd[None, :]).to(tl.float32)
    return dot(w * xb, sel_a) + dot(w * xa, sel_b)


@autotune(configs=_CONFIGS, key=["D", "E"], prune_configs_by=_PRUNE, lean=_LEAN)
@triton.jit(do_not_specialize=["T"])
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, den_ptr, s0_ptr, z0_ptr, s_out_ptr, z_out_ptr,
                sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,
                T, H, D, E, c1, c2, eps,
                HAS_INITIAL: tl.constexpr, STORE_FINAL: tl.constexpr,
                BD: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """o = (numerator / normaliser) for this value tile; den (B, T, H) float32 gets the normaliser (first tile).
    States are contiguous (B, H, F, E) and (B, H, F), F = 1 + D + D^2, in taylor_features' order."""
    DT = q_ptr.dtype.element_ty  # the inputs' dtype, for mm
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    first = iv == 0  # the normaliser (independent of the value columns) is stored by the first value tile
    F = 1 + D + D * D

    rt = tl.arange(0, BT)
    rd = tl.arange(0, BD)
    rv = iv * BV + tl.arange(0, BV)
    f = tl.arange(0, BD * BD)
    md = rd < D
    mv = rv < E
    mf = ((f // BD) < D) & ((f % BD) < D)
    row1 = 1 + rd  # rows of the order-1 and order-2 features in a (F, E) state
    row2 = 1 + D + (f // BD) * D + (f % BD)
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    o_base = o_ptr + b * sob + h * soh
    s_base = bh.to(tl.int64) * F * E
    z_base = bh.to(tl.int64) * F

    s0 = tl.zeros([BV], dtype=tl.float32)
    s1 = tl.zeros([BD, BV], dtype=tl.float32)
    s2 = tl.zeros([BD * BD, BV], dtype=tl.float32)
    z0 = 0.0
    z1 = tl.zeros([BD], dtype=tl.float32)
    z2 = tl.zeros([BD * BD], dtype=tl.float32)
    if HAS_INITIAL:
        s0 = tl.load(s0_ptr + s_base + rv, mask=mv, other=0.0)
        s1 = tl.load(s0_ptr + s_base + row1[:, None] * E + rv[None, :], mask=md[:, None] & mv[None, :], other=0.0)
        s2 = tl.load(s0_ptr + s_base + row2[:, None] * E + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
        z0 = tl.load(z0_ptr + z_base)
        z1 = tl.load(z0_ptr + z_base + row1, mask=md, other=0.0)
        z2 = tl.load(z0_ptr + z_base + row2, mask=mf, other=0.0)

    causal = rt[:, None] >= rt[None, :]
    for start in range(0, T, BT):
        rows = start + rt
        mt = rows < T
        q = _rows(q_base, rows, sqt, rd, mt[:, None] & md[None, :])
        k = _rows(k_base, rows, skt, rd, mt[:, None] & md[None, :])
        v = _rows(v_base, rows, svt, rv, mt[:, None] & mv[None, :])
        qa, qb = _pair_factors(q_base, rows, sqt, mt, D, BD)
        ka, kb = _pair_factors(k_base, rows, skt, mt, D, BD)
        q2 = qa * qb
        k2 = ka * kb

        # Inside the block: the kernel itself.  Padded keys sit above the diagonal of every real query.
        s = dot(q, tl.trans(k)) * (c1 * c1)
        kern = tl.where(causal, 1.0 + s + 0.5 * s * s, 0.0)
        num = mm(kern, v, DT)
        den = tl.sum(kern, axis=1)
        # Earlier blocks: phi(q) against the carried state.
        num += s0[None, :]
        num += mm(q, s1, DT) * c1
        num += mm(q2, s2, DT) * c2
        den += z0 + tl.sum(q.to(tl.float32) * z1[None, :], axis=1) * c1 + tl.sum(q2 * z2[None, :], axis=1) * c2
        den += eps
        y = num / den[:, None]
        tl.store(o_base + rows[:, None].to(tl.int64) * sot + rv[None, :], round_to(y, o_ptr.dtype.element_ty),
                 mask=mt[:, None] & mv[None, :])
        tl.store(den_ptr + (b * T + rows) * H + h, den, mask=rows < tl.where(first, T, 0))

        # Add this block's keys to the state; padded keys have phi = (1, 0, 0): count only real ones in z0.
        s0 += tl.sum(v.to(tl.float32), axis=0)
        s1 += dot(tl.trans(k), v) * c1
        s2 += mm(tl.trans(k2), v, DT) * c2
        z0 += tl.minimum(T - start, BT).to(tl.float32)
        z1 += tl.sum(k.to(tl.float32), axis=0) * c1
        z2 += tl.sum(k2, axis=0) * c2

    if STORE_FINAL:
        tl.store(s_out_ptr + s_base + rv, s0, mask=mv)
        tl.store(s_out_ptr + s_base + row1[:, None] * E + rv[None, :], s1, mask=md[:, None] & mv[None, :])
        tl.store(s_out_ptr + s_base + row2[:, None] * E + rv[None, :], s2, mask=mf[:, None] & mv[None, :])
        tl.store(z_out_ptr + z_base, z0, mask=first)
        tl.store(z_out_ptr + z_base + row1, z1, mask=rd < tl.where(first, D, 0))
        tl.store(z_out_ptr + z_base + row2, z2, mask=mf & (f < tl.where(first, BD * BD, 0)))


@autotune(configs=_CONFIGS, key=["D", "E"], prune_configs_by=_PRUNE, lean=_LEAN, reset_to_zero=["dq_ptr"])
@triton.jit(do_not_specialize=["T"])
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, den_ptr, hn_ptr, s0_ptr, z0_ptr, dq_ptr,
               sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
               slot, T, H, D, E, c1, c2,
               HAS_INITIAL: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """dq's share from this value tile -> dq_ptr[iv] ((n_slots, B, T, H, D) float32, zeroed).  Rescans the state as
    the forward does; dq_t = sum_{j<=t} (1 + s_tj) (g_t . v_j + h_t) k_j / sqrt(d)  +  J_phi(q_t)^T (S g_t + z h_t)."""
    DT = q_ptr.dtype.element_ty  # the inputs' dtype, for mm
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    w = (iv == 0).to(tl.float32)  # the normaliser's terms belong to the first value tile only
    F = 1 + D + D * D

    rt = tl.arange(0, BT)
    rd = tl.arange(0, BD)
    rv = iv * BV + tl.arange(0, BV)
    f = tl.arange(0, BD * BD)
    md = rd < D
    mv = rv < E
    mf = ((f // BD) < D) & ((f % BD) < D)
    row1 = 1 + rd
    row2 = 1 + D + (f // BD) * D + (f % BD)
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    do_base = do_ptr + b * sdb + h * sdh
    dq_base = dq_ptr + iv.to(tl.int64) * slot + b * T * H * D + h * D
    s_base = bh.to(tl.int64) * F * E
    z_base = bh.to(tl.int64) * F

    s1 = tl.zeros([BD, BV], dtype=tl.float32)
    s2 = tl.zeros([BD * BD, BV], dtype=tl.float32)
    z1 = tl.zeros([BD], dtype=tl.float32)
    z2 = tl.zeros([BD * BD], dtype=tl.float32)
    if HAS_INITIAL:  # the order-0 state has no q-gradient
        s1 = tl.load(s0_ptr + s_base + row1[:, None] * E + rv[None, :], mask=md[:, None] & mv[None, :], other=0.0)
        s2 = tl.load(s0_ptr + s_base + row2[:, None] * E + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
        z1 = tl.load(z0_ptr + z_base + row1, mask=md, other=0.0)
        z2 = tl.load(z0_ptr + z_base + row2, mask=mf, other=0.0)

    causal = rt[:, None] >= rt[None, :]
    for start in range(0, T, BT):
        rows = start + rt
        mt = rows < T
        q = _rows(q_base, rows, sqt, rd, mt[:, None] & md[None, :])
        k = _rows(k_base, rows, skt, rd, mt[:, None] & md[None, :])
        v = _rows(v_base, rows, svt, rv, mt[:, None] & mv[None, :])
        do = _rows(do_base, rows, sdt, rv, mt[:, None] & mv[None, :])
        den = tl.load(den_ptr + (b * T + rows) * H + h, mask=mt, other=1.0)
        hn = tl.load(hn_ptr + (b * T + rows) * H + h, mask=mt, other=0.0) * w
        g = do.to(tl.float32) / den[:, None]
        qa, qb = _pair_factors(q_base, rows, sqt, mt, D, BD)
        ka, kb = _pair_factors(k_base, rows, skt, mt, D, BD)

        # Inside the block: d kernel / d s = 1 + s.
        s = dot(q, tl.trans(k)) * (c1 * c1)
        gv = mm(g, tl.trans(v), DT)
        p = tl.where(causal, (1.0 + s) * (gv + hn[:, None]), 0.0)
        dq = mm(p, k, DT) * (c1 * c1)
        # Earlier blocks: d phi(q) = S g + z h, order by order, then through phi's Jacobian.
        dphi1 = mm(g, tl.trans(s1), DT) + hn[:, None] * z1[None, :]
        dq += dphi1 * c1
        dphi2 = mm(g, tl.trans(s2), DT) + hn[:, None] * z2[None, :]
        dq += _pair_grad(dphi2, qa, qb, D, BD) * c2
        tl.store(dq_base + rows[:, None].to(tl.int64) * H * D + rd[None, :], dq, mask=mt[:, None] & md[None, :])

        k2 = ka * kb
        s1 += dot(tl.trans(k), v) * c1
        s2 += mm(tl.trans(k2), v, DT) * c2
        z1 += tl.sum(k.to(tl.float32), axis=0) * c1
        z2 += tl.sum(k2, axis=0) * c2


@autotune(configs=_CONFIGS, key=["D", "E"], prune_configs_by=_PRUNE, lean=_LEAN, reset_to_zero=["dk_ptr"])
@triton.jit(do_not_specialize=["T"])
def _dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, den_ptr, hn_ptr, dsf_ptr, dzf_ptr, dv_ptr, dk_ptr, ds0_ptr, dz0_ptr,
                sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, svgb, svgt, svgh,
                slot, T, H, D, E, c1, c2,
                HAS_DFINAL: tl.constexpr, STORE_DS0: tl.constexpr,
                BD: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """dv (this value tile, final) and dk's share (-> dk_ptr[iv], like dq), scanning blocks last to first with the
    state's gradient dS = dS_final + sum_{later t} phi(q_t)^T g_t, dz likewise with h.  Left after the first block,
    dS, dz are the initial state's gradient (-> ds0_ptr, dz0_ptr when STORE_DS0)."""
    DT = q_ptr.dtype.element_ty  # the inputs' dtype, for mm
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    first = iv == 0
    w = first.to(tl.float32)
    F = 1 + D + D * D

    rt = tl.arange(0, BT)
    rd = tl.arange(0, BD)
    rv = iv * BV + tl.arange(0, BV)
    f = tl.arange(0, BD * BD)
    md = rd < D
    mv = rv < E
    mf = ((f // BD) < D) & ((f % BD) < D)
    row1 = 1 + rd
    row2 = 1 + D + (f // BD) * D + (f % BD)
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    do_base = do_ptr + b * sdb + h * sdh
    dv_base = dv_ptr + b * svgb + h * svgh
    dk_base = dk_ptr + iv.to(tl.int64) * slot + b * T * H * D + h * D
    s_base = bh.to(tl.int64) * F * E
    z_base = bh.to(tl.int64) * F

    ds0 = tl.zeros([BV], dtype=tl.float32)
    ds1 = tl.zeros([BD, BV], dtype=tl.float32)
    ds2 = tl.zeros([BD * BD, BV], dtype=tl.float32)
    dz0 = 0.0
    dz1 = tl.zeros([BD], dtype=tl.float32)
    dz2 = tl.zeros([BD * BD], dtype=tl.float32)
    if HAS_DFINAL:
        ds0 = tl.load(dsf_ptr + s_base + rv, mask=mv, other=0.0)
        ds1 = tl.load(dsf_ptr + s_base + row1[:, None] * E + rv[None, :], mask=md[:, None] & mv[None, :], other=0.0)
        ds2 = tl.load(dsf_ptr + s_base + row2[:, None] * E + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
        dz0 = tl.load(dzf_ptr + z_base)
        dz1 = tl.load(dzf_ptr + z_base + row1, mask=md, other=0.0)
        dz2 = tl.load(dzf_ptr + z_base + row2, mask=mf, other=0.0)

    causal_t = rt[None, :] >= rt[:, None]  # rows are keys j, columns queries t >= j
    n_blocks = tl.cdiv(T, BT)
    for n in range(0, n_blocks):
        rows = (n_blocks - 1 - n) * BT + rt
        mt = rows < T
        q = _rows(q_base, rows, sqt, rd, mt[:, None] & md[None, :])
        k = _rows(k_base, rows, skt, rd, mt[:, None] & md[None, :])
        v = _rows(v_base, rows, svt, rv, mt[:, None] & mv[None, :])
        do = _rows(do_base, rows, sdt, rv, mt[:, None] & mv[None, :])
        den = tl.load(den_ptr + (b * T + rows) * H + h, mask=mt, other=1.0)
        hn = tl.load(hn_ptr + (b * T + rows) * H + h, mask=mt, other=0.0)  # padded queries: g = h = 0
        g = do.to(tl.float32) / den[:, None]
        qa, qb = _pair_factors(q_base, rows, sqt, mt, D, BD)
        ka, kb = _pair_factors(k_base, rows, skt, mt, D, BD)
        k2 = ka * kb

        # Inside the block, transposed: kernel(t, j) and its s-derivative for key rows j.
        s_t = dot(k, tl.trans(q)) * (c1 * c1)
        kern_t = tl.where(causal_t, 1.0 + s_t + 0.5 * s_t * s_t, 0.0)
        dv = mm(kern_t, g, DT)
        vg = mm(v, tl.trans(g), DT)
        p_t = tl.where(causal_t, (1.0 + s_t) * (vg + w * hn[None, :]), 0.0)
        dk = mm(p_t, q, DT) * (c1 * c1)
        # Later blocks and the final state, through the state gradient: dv_j = phi(k_j) dS,
        # d phi(k_j) = dS v_j + dz (the dz part once, in the first value tile).
        dv += ds0[None, :]
        dv += mm(k, ds1, DT) * c1
        dv += mm(k2, ds2, DT) * c2
        tl.store(dv_base + rows[:, None].to(tl.int64) * svgt + rv[None, :], round_to(dv, dv_ptr.dtype.element_ty),
                 mask=mt[:, None] & mv[None, :])
        dphi1 = mm(v, tl.trans(ds1), DT) + w * dz1[None, :]
        dk += dphi1 * c1
        dphi2 = mm(v, tl.trans(ds2), DT) + w * dz2[None, :]
        dk += _pair_grad(dphi2, ka, kb, D, BD) * c2
        tl.store(dk_base + rows[:, None].to(tl.int64) * H * D + rd[None, :], dk, mask=mt[:, None] & md[None, :])

        # This block's queries now count as "later" for the blocks before it.
        q2 = qa * qb
        ds0 += tl.sum(g, axis=0)
        ds1 += mm(tl.trans(q), g, DT) * c1
        ds2 += mm(tl.trans(q2), g, DT) * c2
        dz0 += tl.sum(hn, axis=0)
        dz1 += tl.sum(q.to(tl.float32) * hn[:, None], axis=0) * c1
        dz2 += tl.sum(q2 * hn[:, None], axis=0) * c2

    if STORE_DS0:
        tl.store(ds0_ptr + s_base + rv, ds0, mask=mv)
        tl.store(ds0_ptr + s_base + row1[:, None] * E + rv[None, :], ds1, mask=md[:, None] & mv[None, :])
        tl.store(ds0_ptr + s_base + row2[:, None] * E + rv[None, :], ds2, mask=mf[:, None] & mv[None, :])
        tl.store(dz0_ptr + z_base, dz0, mask=first)
        tl.store(dz0_ptr + z_base + row1, dz1, mask=rd < tl.where(first, D, 0))
        tl.store(dz0_ptr + z_base + row2, dz2, mask=mf & (f < tl.where(first, BD * BD, 0)))


def _grid(b: int, h: int, e: int):
    return lambda meta: (b * h, triton.cdiv(e, meta["BV"]))


# Registered with torch.library (hylo::based_forward / hylo::based_backward): one op each under
# torch.compile(fullgraph=True); autograd joins them.
@kernel_op("hylo::based_forward")
def _based_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s0: torch.Tensor | None,
                   z0: torch.Tensor | None, eps: float, output_final_state: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> out (B, T, H, e), the normaliser den (B, T, H) fp32 (saved for backward), and the final S, z (fp32;
    empty unless output_final_state)."""
    b, t, h, d = q.shape
    e = v.shape[-1]
    n_feat = 1 + d + d * d
    q, k, v = (contiguous_last(x) for x in (q, k, v))
    has_initial = s0 is not None
    if has_initial:
        s0, z0 = (x.to(torch.float32).contiguous() for x in (s0, z0))
    out = output_buffer((b, t, h, e), q.dtype, q.device)
    den = output_buffer((b, t, h), torch.float32, q.device)
    s_out = output_buffer((b, h, n_feat, e), torch.float32, q.device) if output_final_state else None
    z_out = output_buffer((b, h, n_feat), torch.float32, q.device) if output_final_state else None
    dummy = den  # never read or written: the constexpr flags compile those accesses out
    traceable(_fwd_kernel)[_grid(b, h, e)](
        q, k, v, out, den, s0 if has_initial else dummy, z0 if has_initial else dummy,
        dummy if s_out is None else s_out, dummy if z_out is None else z_out,
        *strides3(q), *strides3(k), *strides3(v), *strides3(out),
        t, h, d, e, d ** -0.25, 1 / (2 ** 0.5 * d ** 0.5), eps,
        HAS_INITIAL=has_initial, STORE_FINAL=output_final_state, BD=padded_width(d))
    if s_out is None:  # two distinct empty tensors: an op's outputs may not alias each other
        s_out, z_out = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    return out, den, s_out, z_out


@_based_forward.register_fake
def _(q, k, v, s0, z0, eps, output_final_state):
    b, t, h, d = q.shape
    e, n_feat = v.shape[-1], 1 + d + d * d
    s_shape, z_shape = ((b, h, n_feat, e), (b, h, n_feat)) if output_final_state else ((0,), (0,))
    return (q.new_empty(b, t, h, e), q.new_empty((b, t, h), dtype=torch.float32),
            q.new_empty(s_shape, dtype=torch.float32), q.new_empty(z_shape, dtype=torch.float32))


@kernel_op("hylo::based_backward")
def _based_backward(d_out: torch.Tensor, ds_final: torch.Tensor | None, dz_final: torch.Tensor | None,
                    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, den: torch.Tensor,
                    s0: torch.Tensor | None, z0: torch.Tensor | None, want_ds0: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv, dS0, dz0 (fp32; empty unless want_ds0)."""
    b, t, h, d = q.shape
    e = v.shape[-1]
    n_feat = 1 + d + d * d
    q, k, v = (contiguous_last(x) for x in (q, k, v))
    if s0 is not None:
        s0, z0 = (x.to(torch.float32).contiguous() for x in (s0, z0))
    d_out = contiguous_last(d_out.to(out.dtype))
    # d loss / d normaliser, per token: -(dy . y) / m.  (d loss / d numerator, dy / m, is formed in the kernels.)
    h_norm = -(d_out.float() * out.float()).sum(-1) / den
    has_dfinal = ds_final is not None or dz_final is not None
    if has_dfinal:
        ds_final = (torch.zeros(b, h, n_feat, e, device=q.device) if ds_final is None
                    else ds_final.to(torch.float32).contiguous())
        dz_final = (torch.zeros(b, h, n_feat, device=q.device) if dz_final is None
                    else dz_final.to(torch.float32).contiguous())
    want_ds0 = want_ds0 and s0 is not None
    ds0 = output_buffer((b, h, n_feat, e), torch.float32, q.device) if want_ds0 else None
    dz0 = output_buffer((b, h, n_feat), torch.float32, q.device) if want_ds0 else None

    # dq and dk come as one float32 partial sum per value tile; the autotuner zeroes them between trials.
    slots = triton.cdiv(e, _MIN_BV)
    dq_part = torch.zeros(slots, b, t, h, d, device=q.device)
    dk_part = torch.zeros(slots, b, t, h, d, device=q.device)
    dv = output_buffer(v.shape, v.dtype, v.device)
    dummy = den
    consts = (b * t * h * d, t, h, d, e, d ** -0.25, 1 / (2 ** 0.5 * d ** 0.5))
    traceable(_dq_kernel)[_grid(b, h, e)](
        q, k, v, d_out, den, h_norm, dummy if s0 is None else s0, dummy if z0 is None else z0, dq_part,
        *strides3(q), *strides3(k), *strides3(v), *strides3(d_out), *consts,
        HAS_INITIAL=s0 is not None, BD=padded_width(d))
    traceable(_dkv_kernel)[_grid(b, h, e)](
        q, k, v, d_out, den, h_norm, ds_final if has_dfinal else dummy, dz_final if has_dfinal else dummy,
        dv, dk_part, dummy if ds0 is None else ds0, dummy if dz0 is None else dz0,
        *strides3(q), *strides3(k), *strides3(v), *strides3(d_out), *strides3(dv), *consts,
        HAS_DFINAL=has_dfinal, STORE_DS0=want_ds0, BD=padded_width(d))
    if ds0 is None:  # two distinct empty tensors: an op's outputs may not alias each other
        ds0, dz0 = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    return dq_part.sum(0).to(q.dtype), dk_part.sum(0).to(k.dtype), dv, ds0, dz0


@_based_backward.register_fake
def _(d_out, ds_final, dz_final, q, k, v, out, den, s0, z0, want_ds0):
    b, _, h, d = q.shape
    n_feat = 1 + d + d * d
    s_shape, z_shape = ((b, h, n_feat, v.shape[-1]), (b, h, n_feat)) if want_ds0 and s0 is not None else ((0,), (0,))
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty(s_shape, dtype=torch.float32),
            q.new_empty(z_shape, dtype=torch.float32))


def _based_setup(ctx, inputs, output):
    q, k, v, s0, z0, eps, output_final_state = inputs
    out, den, _, _ = output
    ctx.save_for_backward(q, k, v, out, den, s0, z0)
    ctx.output_final_state = output_final_state


def _based_grads(ctx, d_out, d_den, ds_final, dz_final):
    q, k, v, out, den, s0, z0 = ctx.saved_tensors
    d_out = torch.zeros_like(out) if d_out is None else d_out
    if not ctx.output_final_state:
        ds_final = dz_final = None
    want_ds0 = s0 is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
    dq, dk, dv, ds0, dz0 = _based_backward(d_out, ds_final, dz_final, q, k, v, out, den, s0, z0, want_ds0)
    if want_ds0:
        ds0, dz0 = ds0.to(s0.dtype), dz0.to(z0.dtype)
    else:
        ds0 = dz0 = None
    return dq, dk, dv, ds0, dz0, None, None


_based_forward.register_autograd(_based_grads, setup_context=_based_setup)


def triton_based_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                                  initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
                                  output_final_state: bool = False):
    """-> out (B, T, H, e) in q's dtype, or (out, (S (B, H, F, e), z (B, H, F)) float32) with `output_final_state`;
    states in taylor_features' order, interchangeable with the chunk path's.  Inputs float32/bfloat16/float16."""
    if q.dtype not in TRITON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"backend='triton' takes float32/bfloat16/float16 q, k, v of one dtype, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype} (float64 runs on backend='chunk')")
    d = q.shape[-1]
    s0, z0 = (None, None) if initial_state is None else initial_state
    n_feat = 1 + d + d * d
    if s0 is not None and (s0.shape != (*q.shape[::2], n_feat, v.shape[-1]) or z0.shape != (*q.shape[::2], n_feat)):
        raise ValueError(f"initial_state must be (S (B, H, {n_feat}, e), z (B, H, {n_feat})), got "
                         f"{tuple(s0.shape)}, {tuple(z0.shape)}")
    out, _, s_final, z_final = _based_forward(q, k, v, s0, z0, float(eps), output_final_state)
    return (out, (s_final, z_final)) if output_final_state else out
