"""BASED linear attention in Triton, chunk-parallel, with the Taylor features made in registers.

phi(x) = [1, x c1, vec(x x^T) c2] (c1 = d^(-1/4), c2 = 1/(sqrt(2) sqrt(d))): 1 + d + d^2 features (273 for the
layer's d = 16), never written to memory.  The second order is built as an outer product, x[:, :, None] *
x[:, None, :] reshaped to (rows, 16 * 16) (fla's `fused_chunk_based` shape); its gradient is the two reductions of
the (rows, 16, 16) weight against x: no dots, no re-loading.  Feature dims up to 16 (tiles padded to 16).

As lightning attention does (kernels/lightning/triton.py), tokens are cut into chunks of BT and only the state
recurrence is sequential; with S_c, z_c the numerator and normaliser states entering chunk c:

  states (sequential, `_states_kernel`):  S_{c+1} = S_c + phi(K_c)^T V_c,   z_{c+1} = z_c + sum_j phi(k_j)
  output (parallel over chunks):          n = (1 + s + s^2/2 masked) V + phi(Q) S_c,  m = rowsum(...) + phi(Q) z_c
                                          y = n / (m + eps),   s = q.k / sqrt(d)

Backward.  The loss sees n and m only through g = dy / m and h = -(dy . y) / m, so it is the backward of two linear
attentions (values v with upstream g, values 1 with upstream h): the gradients G_c, Gz_c of the state leaving each
chunk come from the same state pass run in reverse over (phi(Q), g, h) from d final state (what it leaves after
the first chunk is d initial state), and every chunk's dq, dk, dv is then computed in parallel.  States are summed
in fp32 registers and stored in the inputs' dtype for the dots; every product is one pass of bf16/fp16
tensor-core dots with fp32 accumulation (fp32 inputs: exact IEEE fp32).  States (B*H, F, E) are in
taylor_features' order, interchangeable with the chunk path's.
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

MAX_FEATURE_DIM = 16
BD = tl.constexpr(16)  # the feature dim's tile: d <= 16, padded (a dot's inner dim is at least 16)
# Chunk length: 64 on a GPU; 16 under the interpreter, so tiny test shapes span several chunks.
CHUNK = 16 if interpreting() else 64
_CONFIGS = [  # value tiles; the first is what the interpreter runs (several value tiles in tests)
    triton.Config({"BV": 16}, num_warps=4),
    triton.Config({"BV": 32}, num_warps=4),
    triton.Config({"BV": 64}, num_warps=8),
]


def _prune_for_float32(configs, named_args, **kwargs):
    """float32 inputs take IEEE fp32 dots (no tensor cores) staged through shared memory: keep value tiles of 16
    (the order-2 state is 256 x BV)."""
    if named_args["V"].dtype != torch.float32:
        return configs
    return [c for c in configs if c.kwargs["BV"] <= 16]


_PRUNE = {"early_config_prune": _prune_for_float32}
_LEAN = (1, 2)  # HYLO_AUTOTUNE=lean: value tiles of 32 and 64


@triton.jit
def _tile(base, rows, ok, s_t, n_cols, BC: tl.constexpr):
    """base[rows, :n_cols] as a (len(rows), BC) tile, zero outside (unit stride along the columns)."""
    cols = tl.arange(0, BC)
    return tl.load(base + rows.to(tl.int64)[:, None] * s_t + cols[None, :], mask=ok[:, None] & (cols < n_cols)[None, :],
                   other=0.0)


@triton.jit
def _square(x, ROWS: tl.constexpr):
    """vec(x x^T) per row: (ROWS, BD) -> (ROWS, BD*BD), feature a*BD + b = x_a x_b; an outer product in registers."""
    return tl.reshape(x[:, :, None] * x[:, None, :], (ROWS, BD * BD))


@triton.jit
def _square_grad(w, x, ROWS: tl.constexpr):
    """d/dx of sum_f w_f (x x^T)_f per row: sum_b w[a, b] x_b + sum_b w[b, a] x_b (two reductions, no dots)."""
    w3 = tl.reshape(w, (ROWS, BD, BD))
    return tl.sum(w3 * x[:, None, :], 2) + tl.sum(w3 * x[:, :, None], 1)


@triton.jit
def _order2_rows(D):
    """Tile index a*BD + b of the second order -> state row 1 + D + a*D + b (taylor_features' order), and which
    tile entries are real features (a, b < D)."""
    f = tl.arange(0, BD * BD)
    a, b = f // BD, f % BD
    return 1 + D + a * D + b, (a < D) & (b < D)


@triton.jit
def _load_state(S, Z, offset, offs_v, mask_v, D, E, LOAD_Z: tl.constexpr):
    """The three orders of a (F, E) state at element offset `offset` (and of its (F,) normaliser at offset / E)."""
    rd = tl.arange(0, BD)
    r2, m2 = _order2_rows(D)
    s0 = tl.load(S + offset + offs_v, mask=mask_v, other=0.0)
    s1 = tl.load(S + offset + (1 + rd)[:, None] * E + offs_v[None, :], mask=(rd < D)[:, None] & mask_v[None, :],
                 other=0.0)
    s2 = tl.load(S + offset + r2[:, None] * E + offs_v[None, :], mask=m2[:, None] & mask_v[None, :], other=0.0)
    z1 = tl.zeros([BD], dtype=tl.float32)
    z2 = tl.zeros([BD * BD], dtype=tl.float32)
    z0 = tl.sum(z1, 0)
    if LOAD_Z:
        z_offset = offset // E
        z0 = tl.load(Z + z_offset).to(tl.float32)
        z1 = tl.load(Z + z_offset + 1 + rd, mask=rd < D, other=0.0).to(tl.float32)
        z2 = tl.load(Z + z_offset + r2, mask=m2, other=0.0).to(tl.float32)
    return s0, s1, s2, z0, z1, z2


@triton.jit
def _store_state(S, Z, offset, offs_v, mask_v, s0, s1, s2, z0, z1, z2, D, E, STORE_Z):
    rd = tl.arange(0, BD)
    r2, m2 = _order2_rows(D)
    DT = S.dtype.element_ty
    tl.store(S + offset + offs_v, round_to(s0, DT), mask=mask_v)
    tl.store(S + offset + (1 + rd)[:, None] * E + offs_v[None, :], round_to(s1, DT),
             mask=(rd < D)[:, None] & mask_v[None, :])
    tl.store(S + offset + r2[:, None] * E + offs_v[None, :], round_to(s2, DT), mask=m2[:, None] & mask_v[None, :])
    # The normaliser does not depend on the value columns: one value tile (STORE_Z) writes it.
    z_offset = offset // E
    tl.store(Z + z_offset + tl.arange(0, 1), tl.zeros([1], dtype=tl.float32) + z0, mask=tl.arange(0, 1) < STORE_Z)
    tl.store(Z + z_offset + 1 + rd, z1, mask=(rd < D) & ((rd * 0 + STORE_Z) > 0))
    tl.store(Z + z_offset + r2, z2, mask=m2 & ((r2 * 0 + STORE_Z) > 0))


@autotune(configs=_CONFIGS, key=["D", "E", "REVERSE"], prune_configs_by=_PRUNE, lean=_LEAN)
@triton.jit(do_not_specialize=["T", "NC", "n_docs"])
def _states_kernel(X, V, W, INIT_S, INIT_Z, STATES, NORMS, FINAL_S, FINAL_Z, CU, CHUNK0,
                   sx_b, sx_t, sx_h, sv_b, sv_t, sv_h, T, H, D, E, c1, c2, NC, n_docs,
                   HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr,
                   BT: tl.constexpr, BV: tl.constexpr):
    """The sequential part, one value tile of the state per program.  Forward (X = k, V = v, weights 1):
    STATES[bh, c] = S_c, NORMS[bh, c] = z_c, then S += phi(K)^T V, z += sum phi(k).  REVERSE (X = q, V = g, W = h):
    STATES[bh, c] = G_{c+1} (after chunk c), then G += phi(Q)^T g, Gz += phi(Q)^T h.  STATES (B*H, NT, F, E) in
    V's dtype, NORMS (B*H, NT, F) fp32 (written by the first value tile); INIT/FINAL (B*H, F, E) and (B*H, F) fp32.
    VARLEN: one program per (document, head, value tile), the chunk table's slots (CHUNK0: each document's first);
    INIT enters the first document walked (the last one in REVERSE), FINAL is the last one's."""
    b, h, row, bos, t_doc, slot0, enters, leaves = state_program(tl.program_id(0), T, H, NC, n_docs, CU, CHUNK0,
                                                                 VARLEN, REVERSE, BT)
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask_v = offs_v < E
    first_tile = (tl.program_id(1) == 0).to(tl.int32)
    F = 1 + D + D * D
    s0 = tl.zeros([BV], dtype=tl.float32)
    s1 = tl.zeros([BD, BV], dtype=tl.float32)
    s2 = tl.zeros([BD * BD, BV], dtype=tl.float32)
    z1 = tl.zeros([BD], dtype=tl.float32)
    z2 = tl.zeros([BD * BD], dtype=tl.float32)
    z0 = tl.sum(z1, 0)  # a float32 scalar
    if HAS_INIT:
        s0, s1, s2, z0, z1, z2 = _load_state(INIT_S, INIT_Z, row.to(tl.int64) * F * E, offs_v, mask_v, D, E, True)
        f = enters.to(tl.float32)  # packed documents: the initial state enters one document only
        s0, s1, s2 = s0.to(tl.float32) * f, s1.to(tl.float32) * f, s2.to(tl.float32) * f
        z0, z1, z2 = z0 * f, z1 * f, z2 * f
    x_base, v_base = X + b * sx_b + h * sx_h + bos * sx_t, V + b * sv_b + h * sv_h + bos * sv_t
    n_chunks = tl.cdiv(t_doc, BT)
    for n in range(0, n_chunks):
        c = n_chunks - 1 - n if REVERSE else n
        _store_state(STATES, NORMS, (slot0 + c) * F * E, offs_v, mask_v, s0, s1, s2, z0, z1, z2, D, E, first_tile)
        rows = c * BT + tl.arange(0, BT)
        ok = rows < t_doc
        x = _tile(x_base, rows, ok, sx_t, D, BD).to(tl.float32)
        v = tl.load(v_base + rows.to(tl.int64)[:, None] * sv_t + offs_v[None, :], mask=ok[:, None] & mask_v[None, :],
                    other=0.0)
        if REVERSE:
            w = tl.load(W + (b * H + h) * T + bos + rows, mask=ok, other=0.0)
        else:
            w = ok.to(tl.float32)
        x1 = x * c1
        x2 = _square(x, BT) * c2
        s0 += tl.sum(v.to(tl.float32), 0)
        s1 += dot(tl.trans(round_to(x1, v.dtype)), v)
        s2 += dot(tl.trans(round_to(x2, v.dtype)), v)
        z0 += tl.sum(w, 0)
        z1 += tl.sum(x1 * w[:, None], 0)
        z2 += tl.sum(x2 * w[:, None], 0)
    if STORE_FINAL:
        last = leaves.to(tl.int32)
        _store_state(FINAL_S, FINAL_Z, row.to(tl.int64) * F * E, offs_v, mask_v & ((offs_v * 0 + last) > 0),
                     s0, s1, s2, z0, z1, z2, D, E, first_tile * last)


@autotune(configs=_CONFIGS, key=["D", "E"], prune_configs_by=_PRUNE, lean=_LEAN)
@triton.jit(do_not_specialize=["T", "NC"])
def _output_kernel(Q, K, V, O, DEN, STATES, NORMS, CHUNK_ROWS,
                   sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h,
                   T, H, D, E, c1, c2, eps, NC, VARLEN: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """One chunk, one value tile: y = n / m; DEN (B, H, T) fp32 gets m = normaliser + eps (first value tile)."""
    b, h, row0, end, slot = chunk_program(tl.program_id(0), tl.program_id(1), T, H, NC, CHUNK_ROWS, VARLEN, BT)
    offs_v = tl.program_id(2) * BV + tl.arange(0, BV)
    mask_v = offs_v < E
    rt = tl.arange(0, BT)
    rows = row0 + rt
    ok = rows < end
    q = _tile(Q + b * sq_b + h * sq_h, rows, ok, sq_t, D, BD)
    k = _tile(K + b * sk_b + h * sk_h, rows, ok, sk_t, D, BD)
    v = tl.load(V + b * sv_b + h * sv_h + rows.to(tl.int64)[:, None] * sv_t + offs_v[None, :],
                mask=ok[:, None] & mask_v[None, :], other=0.0)
    # Inside the chunk: the quadratic kernel, causal.
    s = dot(q, tl.trans(k)) * (c1 * c1)
    visible = (rt[None, :] <= rt[:, None]) & ok[None, :]
    kern = tl.where(visible, 1.0 + s + 0.5 * s * s, 0.0)
    num = dot(round_to(kern, v.dtype), v)
    den = tl.sum(kern, 1)
    # Earlier chunks, through the state entering this one.
    F = 1 + D + D * D
    s0, s1, s2, z0, z1, z2 = _load_state(STATES, NORMS, slot * F * E, offs_v, mask_v, D, E, True)
    q1 = q.to(tl.float32) * c1
    q2 = _square(q.to(tl.float32), BT) * c2
    num += s0.to(tl.float32)[None, :] + dot(round_to(q1, v.dtype), s1) + dot(round_to(q2, v.dtype), s2)
    den += z0 + tl.sum(q1 * z1[None, :], 1) + tl.sum(q2 * z2[None, :], 1)
    m = den + eps
    tl.store(O + b * so_b + h * so_h + rows.to(tl.int64)[:, None] * so_t + offs_v[None, :],
             round_to(num / m[:, None], O.dtype.element_ty), mask=ok[:, None] & mask_v[None, :])
    tl.store(DEN + (b * H + h) * T + rows, m, mask=rows < tl.where(tl.program_id(2) == 0, end, 0))


@triton.jit(do_not_specialize=["T", "NC"])
def _grads_kernel(Q, K, V, G, HN, STATES, NORMS, DSTATES, DNORMS, DQ, DK_, DV_, CHUNK_ROWS,
                  sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sg_b, sg_t, sg_h, sx_b, sx_t, sx_h,
                  sy_b, sy_t, sy_h, T, H, D, E, c1, c2, NC,
                  VARLEN: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
    """One chunk: dq, dk (sx_* strides), dv (sy_*) from g = dy/m, h = -(dy . y)/m (HN, (B, H, T)), the state
    entering the chunk (STATES, NORMS) and the gradient of the state leaving it (DSTATES, DNORMS).  Whole value
    dim per program (BE >= E)."""
    b, h, row0, end, slot = chunk_program(tl.program_id(0), tl.program_id(1), T, H, NC, CHUNK_ROWS, VARLEN, BT)
    offs_e = tl.arange(0, BE)
    mask_e = offs_e < E
    rt = tl.arange(0, BT)
    rows = row0 + rt
    ok = rows < end
    q = _tile(Q + b * sq_b + h * sq_h, rows, ok, sq_t, D, BD)
    k = _tile(K + b * sk_b + h * sk_h, rows, ok, sk_t, D, BD)
    v = _tile(V + b * sv_b + h * sv_h, rows, ok, sv_t, E, BE)
    g = _tile(G + b * sg_b + h * sg_h, rows, ok, sg_t, E, BE)
    hn = tl.load(HN + (b * H + h) * T + rows, mask=ok, other=0.0)
    DT = v.dtype

    # Inside the chunk: y's numerator and normaliser through the quadratic kernel K(s) = 1 + s + s^2/2.
    s = dot(q, tl.trans(k)) * (c1 * c1)
    visible = (rt[None, :] <= rt[:, None]) & ok[None, :] & ok[:, None]
    kern = tl.where(visible, 1.0 + s + 0.5 * s * s, 0.0)
    d_kern = tl.where(visible, dot(g, tl.trans(v)) + hn[:, None], 0.0)
    d_s = round_to(d_kern * (1.0 + s) * (c1 * c1), DT)
    dq = dot(d_s, k)
    dk = dot(tl.trans(d_s), q)
    dv = dot(tl.trans(round_to(kern, DT)), g)

    F = 1 + D + D * D
    offset = slot * F * E
    qf, kf = q.to(tl.float32), k.to(tl.float32)
    # Queries against the state entering the chunk: d phi(q) = S g + z h.
    _, s1, s2, _, z1, z2 = _load_state(STATES, NORMS, offset, offs_e, mask_e, D, E, True)
    d_phi1 = dot(g, tl.trans(s1)) + hn[:, None] * z1[None, :]
    d_phi2 = dot(g, tl.trans(s2)) + hn[:, None] * z2[None, :]
    dq += c1 * d_phi1 + c2 * _square_grad(d_phi2, qf, BT)
    # Keys (and values) into the state leaving it: d phi(k) = G v + Gz, dv += phi(k) G.
    g0, g1, g2, _, gz1, gz2 = _load_state(DSTATES, DNORMS, offset, offs_e, mask_e, D, E, True)
    d_phi1 = dot(v, tl.trans(g1)) + gz1[None, :]
    d_phi2 = dot(v, tl.trans(g2)) + gz2[None, :]
    dk += tl.where(ok[:, None], c1 * d_phi1 + c2 * _square_grad(d_phi2, kf, BT), 0.0)
    dv += g0.to(tl.float32)[None, :] + dot(round_to(kf * c1, DT), g1) + dot(round_to(_square(kf, BT) * c2, DT), g2)

    r = rows.to(tl.int64)[:, None]
    cols = tl.arange(0, BD)
    mask_d = ok[:, None] & (cols < D)[None, :]
    tl.store(DQ + b * sx_b + h * sx_h + r * sx_t + cols[None, :], round_to(dq, DQ.dtype.element_ty), mask=mask_d)
    tl.store(DK_ + b * sx_b + h * sx_h + r * sx_t + cols[None, :], round_to(dk, DK_.dtype.element_ty), mask=mask_d)
    tl.store(DV_ + b * sy_b + h * sy_h + r * sy_t + offs_e[None, :], round_to(dv, DV_.dtype.element_ty),
             mask=ok[:, None] & mask_e[None, :])


# ---------------------------------------------------------------------------------------------- launchers
def _constants(d: int) -> tuple[float, float]:
    return d ** -0.25, 1 / (2 ** 0.5 * d ** 0.5)


def _state_pass(x, v, w, init, final, reverse: bool, docs: ChunkTable | None):
    """Runs `_states_kernel`; returns the per-chunk states (B*H, NT, F, E) in v's dtype and normalisers
    (B*H, NT, F) fp32 (with packed documents: (H, chunks of the table, ...))."""
    b, t, h, d = x.shape
    e = v.shape[-1]
    n_chunks, n_feat = (triton.cdiv(t, CHUNK) if docs is None else docs.chunks), 1 + d + d * d
    n_docs = 1 if docs is None else docs.documents
    states = output_buffer((b * h, n_chunks, n_feat, e), v.dtype, v.device)
    norms = output_buffer((b * h, n_chunks, n_feat), torch.float32, v.device)
    dummy = norms  # never read or written: the constexpr flags compile those accesses out
    init_s, init_z = (dummy, dummy) if init is None else init
    final_s, final_z = (dummy, dummy) if final is None else final
    table = (dummy, dummy) if docs is None else (docs.cu, docs.first_chunk)
    traceable(_states_kernel)[lambda meta: (b * h * n_docs, triton.cdiv(e, meta["BV"]))](
        x, v, dummy if w is None else w, init_s, init_z, states, norms, final_s, final_z, *table,
        *strides3(x), *strides3(v), t, h, d, e, *_constants(d), n_chunks, n_docs,
        HAS_INIT=init is not None, STORE_FINAL=final is not None, REVERSE=reverse, VARLEN=docs is not None,
        BT=CHUNK)
    return states, norms


def _fp32_state(s, z):
    return None if s is None else (s.to(torch.float32).contiguous(), z.to(torch.float32).contiguous())


# Registered with torch.library (hylo::based_forward / hylo::based_backward): one op each under
# torch.compile(fullgraph=True); autograd joins them.
@kernel_op("hylo::based_forward")
def _based_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s0: torch.Tensor | None,
                   z0: torch.Tensor | None, eps: float, output_final_state: bool, cu_seqlens: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> out (B, T, H, e), m = normaliser + eps (B, H, T) fp32 (saved for backward), and the final S, z (fp32;
    empty unless output_final_state)."""
    b, t, h, d = q.shape
    e = v.shape[-1]
    n_feat = 1 + d + d * d
    q, k, v = (contiguous_last(x) for x in (q, k, v))
    final = None
    if output_final_state:
        final = (output_buffer((b, h, n_feat, e), torch.float32, q.device),
                 output_buffer((b, h, n_feat), torch.float32, q.device))
    docs = None if cu_seqlens is None else chunk_table(cu_seqlens, CHUNK, q.device)
    states, norms = _state_pass(k, v, None, _fp32_state(s0, z0), final, reverse=False, docs=docs)
    out = output_buffer((b, t, h, e), q.dtype, q.device)
    den = output_buffer((b, h, t), torch.float32, q.device)
    chunks = triton.cdiv(t, CHUNK) if docs is None else docs.chunks
    traceable(_output_kernel)[lambda meta: (b * h, chunks, triton.cdiv(e, meta["BV"]))](
        q, k, v, out, den, states, norms, den if docs is None else docs.rows,
        *strides3(q), *strides3(k), *strides3(v), *strides3(out),
        t, h, d, e, *_constants(d), eps, chunks, VARLEN=docs is not None, BT=CHUNK)
    if final is None:  # two distinct empty tensors: an op's outputs may not alias each other
        final = (q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32))
    return out, den, *final


@_based_forward.register_fake
def _(q, k, v, s0, z0, eps, output_final_state, cu_seqlens):
    b, t, h, d = q.shape
    e, n_feat = v.shape[-1], 1 + d + d * d
    s_shape, z_shape = ((b, h, n_feat, e), (b, h, n_feat)) if output_final_state else ((0,), (0,))
    return (q.new_empty(b, t, h, e), q.new_empty((b, h, t), dtype=torch.float32),
            q.new_empty(s_shape, dtype=torch.float32), q.new_empty(z_shape, dtype=torch.float32))


@kernel_op("hylo::based_backward")
def _based_backward(d_out: torch.Tensor, ds_final: torch.Tensor | None, dz_final: torch.Tensor | None,
                    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, den: torch.Tensor,
                    s0: torch.Tensor | None, z0: torch.Tensor | None, want_ds0: bool, cu_seqlens: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv, dS0, dz0 (fp32; empty unless want_ds0)."""
    b, t, h, d = q.shape
    e = v.shape[-1]
    n_feat = 1 + d + d * d
    q, k, v = (contiguous_last(x) for x in (q, k, v))
    m = den.transpose(1, 2)[..., None]  # (B, T, H, 1)
    g = (d_out.float() / m).to(v.dtype).contiguous()
    hn = (-(d_out.float() * out.float()).sum(-1, keepdim=True) / m)[..., 0].transpose(1, 2).contiguous()
    d_final = None
    if ds_final is not None or dz_final is not None:
        d_final = (torch.zeros(b, h, n_feat, e, device=q.device) if ds_final is None else ds_final,
                   torch.zeros(b, h, n_feat, device=q.device) if dz_final is None else dz_final)
    want_ds0 = want_ds0 and s0 is not None
    ds0 = None
    if want_ds0:
        ds0 = (output_buffer((b, h, n_feat, e), torch.float32, q.device),
               output_buffer((b, h, n_feat), torch.float32, q.device))
    docs = None if cu_seqlens is None else chunk_table(cu_seqlens, CHUNK, q.device)
    states, norms = _state_pass(k, v, None, _fp32_state(s0, z0), None, reverse=False, docs=docs)  # recomputed
    d_states, d_norms = _state_pass(q, g, hn, _fp32_state(*d_final) if d_final else None, ds0, reverse=True,
                                    docs=docs)
    dq, dk, dv = (output_buffer(x.shape, x.dtype, x.device) for x in (q, k, v))
    chunks = triton.cdiv(t, CHUNK) if docs is None else docs.chunks
    traceable(_grads_kernel)[(b * h, chunks)](
        q, k, v, g, hn, states, norms, d_states, d_norms, dq, dk, dv, hn if docs is None else docs.rows,
        *strides3(q), *strides3(k), *strides3(v), *strides3(g), *strides3(dq), *strides3(dv),
        t, h, d, e, *_constants(d), chunks, VARLEN=docs is not None, BT=CHUNK, BE=padded_width(e),
        num_warps=4 if e <= 64 else 8)
    if ds0 is None:  # two distinct empty tensors: an op's outputs may not alias each other
        ds0 = (q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32))
    return dq, dk, dv, *ds0


@_based_backward.register_fake
def _(d_out, ds_final, dz_final, q, k, v, out, den, s0, z0, want_ds0, cu_seqlens):
    b, _, h, d = q.shape
    n_feat = 1 + d + d * d
    s_shape, z_shape = ((b, h, n_feat, v.shape[-1]), (b, h, n_feat)) if want_ds0 and s0 is not None else ((0,), (0,))
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), q.new_empty(s_shape, dtype=torch.float32),
            q.new_empty(z_shape, dtype=torch.float32))


def _based_setup(ctx, inputs, output):
    q, k, v, s0, z0, eps, output_final_state, cu_seqlens = inputs
    out, den, _, _ = output
    ctx.save_for_backward(q, k, v, out, den, s0, z0, cu_seqlens)
    ctx.output_final_state = output_final_state


def _based_grads(ctx, d_out, d_den, ds_final, dz_final):
    q, k, v, out, den, s0, z0, cu_seqlens = ctx.saved_tensors
    d_out = torch.zeros_like(out) if d_out is None else d_out
    if not ctx.output_final_state:
        ds_final = dz_final = None
    want_ds0 = s0 is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
    dq, dk, dv, ds0, dz0 = _based_backward(d_out, ds_final, dz_final, q, k, v, out, den, s0, z0, want_ds0,
                                           cu_seqlens)
    if want_ds0:
        ds0, dz0 = ds0.to(s0.dtype), dz0.to(z0.dtype)
    else:
        ds0 = dz0 = None
    return dq, dk, dv, ds0, dz0, None, None, None


_based_forward.register_autograd(_based_grads, setup_context=_based_setup)


def triton_based_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                                  initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
                                  output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None):
    """-> out (B, T, H, e) in q's dtype, or (out, (S (B, H, F, e), z (B, H, F)) float32) with `output_final_state`;
    states in taylor_features' order, interchangeable with the chunk path's.  Inputs float32/bfloat16/float16,
    feature dim <= 16.  `cu_seqlens` (checked by the caller; batch 1): packed documents in the same launches; the
    initial state enters the first document, the final state is the last one's."""
    if q.dtype not in TRITON_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"backend='triton' takes float32/bfloat16/float16 q, k, v of one dtype, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype} (float64 runs on backend='chunk')")
    d = q.shape[-1]
    if d > MAX_FEATURE_DIM:
        raise ValueError(f"backend='triton' takes feature dims up to {MAX_FEATURE_DIM} (the layer's 16), got {d}: "
                         f"use backend='chunk'")
    s0, z0 = (None, None) if initial_state is None else initial_state
    n_feat = 1 + d + d * d
    if s0 is not None and (s0.shape != (*q.shape[::2], n_feat, v.shape[-1]) or z0.shape != (*q.shape[::2], n_feat)):
        raise ValueError(f"initial_state must be (S (B, H, {n_feat}, e), z (B, H, {n_feat})), got "
                         f"{tuple(s0.shape)}, {tuple(z0.shape)}")
    out, _, s_final, z_final = _based_forward(q, k, v, s0, z0, float(eps), output_final_state, cu_seqlens)
    return (out, (s_final, z_final)) if output_final_state else out
