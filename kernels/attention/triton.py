"""Softmax attention as Triton flash-attention kernels: forward, and backward with deterministic dK/dV and dQ.

Same semantics as `chunk.py` (causal or not, sliding window, pinned first tokens, learned sinks, grouped-query
heads, fewer queries than keys, differentiable log-sum-exp), on (B, T, H, d) tensors read through their strides.

* Positions follow `chunk.Layout`: query i sits at q_start + i, key j at k_start + j (by default the queries are
  the last Tq of the keys).  Ring attention calls the kernels on one (query segment, key segment) pair at a time.
* Each query block only visits the key blocks it can see, computed from causality and the window, so a window-W
  layer costs O(T*W); pinned keys add one extra short loop over the first blocks.
* Grouped-query attention indexes the k/v head as h // G instead of repeating k/v.  The dK/dV kernel loops over
  the G query heads of its k/v head, so no two programs write the same gradient (no atomics: deterministic).
  `train.attention_dq=atomic` (hylo.kernels.ops.set_backward_dq) instead adds dQ from the dK/dV kernel with
  float32 atomics, as FlashAttention-2 does: one pass over the scores instead of two, not bit-reproducible.
* Softmax statistics and accumulators are float32 whatever the input dtype; exponentials are taken in base 2
  with log2(e) folded into the scale.
* The sink logit, and optionally an incoming partial result (out, lse), join the online softmax before the key
  loop as pseudo-keys: the sink with logit `sink` and value 0, the partial with logit lse and value out.  That
  merges in one pass what `merge` below does after the fact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hylo.kernels.attention.dq_mode import atomic_dq
from hylo.kernels.dispatch import TRITON_DTYPES
from hylo.kernels.triton_support import (
    autotune,
    contiguous_last,
    device_shared_memory_kb,
    interpreting,
    kernel_op,
    output_buffer,
    strides3,
    traceable,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Kernels may only read globals declared constexpr.
_LOG2E, _LN2 = tl.constexpr(LOG2E), tl.constexpr(LN2)
# Two CPU interpreter quirks are worked around when it runs (see _dot and _cast).
_INTERPRETING = tl.constexpr(interpreting())
HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = TRITON_DTYPES

# The first config of each list is the one the CPU interpreter runs: small blocks there make the tests' short
# sequences span several blocks (so block skipping and masking get exercised).  On a GPU autotune picks among the
# rest, less the tiles `_target_prune` drops for that GPU.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)


def _configs(tiles: list[tuple[int, int, int, int]]) -> list:
    return [_INTERPRETER_CONFIG] + [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                                    for m, n, w, s in tiles]


# (BLOCK_M, BLOCK_N, num_warps, num_stages).  The backward holds more tiles, so it is tiled apart from the forward
# (as FlashAttention-2 and the Triton tutorial do): dK/dV keeps a key block (BLOCK_N) and its two fp32 accumulators
# while it walks thin query tiles (BLOCK_M); dQ keeps a query block and walks thin key tiles.  Every candidate was
# chosen from bench/kernel_report.py at d = 128, bf16, and each GPU keeps only those that compile spill-free there.
CONFIGS = _configs([(128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (64, 128, 8, 2),
                    (64, 64, 4, 2), (64, 64, 8, 2)])
BWD_KV_CONFIGS = _configs([(16, 64, 8, 1), (16, 32, 4, 2), (16, 64, 8, 2), (32, 64, 8, 2), (16, 32, 4, 1)])
# 128x32 w8: the Triton tutorial's dQ tile, spill-free mma on sm_80 (64x64 w4, spill-free on sm_90 unpacked,
# spills with packed documents there: not a candidate)
BWD_Q_CONFIGS = _configs([(64, 32, 8, 2), (64, 16, 4, 3), (64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)])
TUNE_KEY = ["D", "DV", "CAUSAL", "WINDOW", "PRECISION"]  # not the lengths: see triton_support.autotune
BWD_KV_KEY = TUNE_KEY + ["ATOMIC_DQ"]


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    """Float32 tiles are twice as large: at head dim >= 128 the big ones overflow shared memory and take minutes
    to compile, so autotune does not try them (sizes from bench/kernel_report.py)."""
    head_dim = kwargs.get("D", named_args.get("D", 0))
    if named_args["Q"].element_size() == 4 and head_dim >= 128:
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
        smem = device_shared_memory_kb()
        if smem is not None and smem < 200:  # the 3-stage fp32 forward needs 176 KB: over an A100's 163 KB
            configs = [c for c in configs if c.num_stages <= 2]
    return configs




def _tile_of(config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _target_prune(spills: dict[tuple[bool, str], set[tuple[int, int, int, int]]]):
    """`_prune`, and for 16-bit inputs also the tiles that make ptxas spill registers on this GPU.

    `spills` maps (Hopper?, variant) to the tiles that spill there at d = 128, measured by bench/kernel_report.py;
    the variant is "atomic" (the dK/dV kernel adding dQ), else "window" or "full".  Hopper is told apart by its
    shared memory (H100/H200 227 KB, A100 163 KB, Ada 99 KB).  These kernels sit at the 255-register limit, where
    one more live value spills, so which tiles spill changes with the target and the variant, not only with the
    tile size.  Smaller head dims spill less: the table only over-prunes there."""
    def prune(configs: list, named_args: dict, **kwargs) -> list:
        configs = _prune(configs, named_args, **kwargs)
        smem = device_shared_memory_kb()
        if smem is None or named_args["Q"].element_size() == 4:
            return configs
        def flag(name: str) -> bool:
            return bool(kwargs.get(name, named_args.get(name, False)))
        variant = "atomic" if flag("ATOMIC_DQ") else "window" if flag("WINDOW") else "full"
        spilling = spills.get((smem >= 200, variant), set())
        kept = [c for c in configs if _tile_of(c) not in spilling]
        return kept or configs[:1]
    return {"early_config_prune": prune}


HOPPER, PRE_HOPPER = True, False
PRUNE_FWD = _target_prune({
    (HOPPER, "window"): {(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)},  # 4 B each
    # 2.1 KB, 250-760 B, 400-470 B, 8 B (the last only unwindowed; dropped for both to keep one list)
    (PRE_HOPPER, "full"): {(128, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2), (128, 32, 8, 2)},
    (PRE_HOPPER, "window"): {(128, 128, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2), (128, 32, 8, 2)},
})
PRUNE_BWD_KV = _target_prune({
    (HOPPER, "full"): {(16, 64, 8, 2), (32, 64, 8, 2)},  # 8 B, 56 B
    (HOPPER, "window"): {(16, 64, 8, 2), (32, 64, 8, 2)},
    # the dQ tile and its dot on top: every wgmma tile spills (108-588 B), the 16x32 mma tiles do not
    (HOPPER, "atomic"): {(16, 64, 8, 1), (16, 64, 8, 2), (32, 64, 8, 2)},
    (PRE_HOPPER, "atomic"): {(16, 32, 4, 2), (32, 64, 8, 2)},  # 8 B, 136 B
})
PRUNE_BWD_Q = _target_prune({
    (HOPPER, "full"): {(128, 32, 8, 2)},  # 12 B
    (HOPPER, "window"): {(64, 64, 8, 2), (128, 32, 8, 2)},  # 4 B, 16 B
    (PRE_HOPPER, "full"): {(64, 32, 4, 2)},  # 8 B
    (PRE_HOPPER, "window"): {(64, 32, 4, 2), (64, 64, 8, 2)},
})
# HYLO_AUTOTUNE=lean keeps two or three candidates per kernel (indices into the lists above), chosen so that at
# least one survives every target's pruning: forward 128x64 w8 and 128x32 w8 (one of them spills on each GPU),
# dK/dV 16x64 w8 s1, 16x32 w4 s2 and s1 (the atomic-dQ variant), dQ 64x32 w8 and 64x16 w4.
LEAN = (1, 4)
LEAN_BWD_KV = (1, 2, 5)
LEAN_BWD_Q = (1, 2)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernels take these inputs (dtype and head dims); `auto` falls back to the chunk path if not."""
    return (q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] in HEAD_DIMS and v.shape[-1] in HEAD_DIMS)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"the Triton attention kernels take float32/float16/bfloat16 q, k, v of one dtype, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype} (backend='chunk' takes any float dtype)")
    for name, d in (("q/k", q.shape[-1]), ("v", v.shape[-1])):
        if d not in HEAD_DIMS:
            raise ValueError(f"the Triton attention kernels need {name} head dims in {HEAD_DIMS}, got {d} "
                             f"(backend='chunk' takes any head dim)")


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs keep float32 products unless the user allowed TF32 matmuls, as torch.matmul does.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@dataclass(frozen=True)
class Spec:
    """What a call attends to, apart from the tensors: the scale, the mask and where queries and keys sit."""

    scale: float
    causal: bool = True
    window: int | None = None
    n_pinned: int = 0
    q_start: int = 0
    k_start: int = 0

    def args(self) -> tuple:
        return self.q_start, self.k_start, self.window or 0, self.n_pinned if self.window is not None else 0


def make_spec(q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, window: int | None = None,
              scale: float | None = None, n_pinned: int = 0, q_start: int | None = None, k_start: int = 0) -> Spec:
    if window is not None and (window < 1 or not causal):
        raise ValueError(f"window={window} needs causal=True and window >= 1")
    if n_pinned < 0:
        raise ValueError(f"n_pinned={n_pinned} must be >= 0")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q_start = k_start + k.shape[1] - q.shape[1] if q_start is None else q_start
    return Spec(scale, causal, window, n_pinned, q_start, k_start)


# ---------------------------------------------------------------------------------------------- shared pieces
@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if _INTERPRETING:
        # the interpreter multiplies bfloat16 operands as their raw uint16 bits; 16-bit products are exact in
        # float32, as on tensor cores
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tile(base, rows, stride, cols):
    """Pointers to a (rows, cols) tile; row offsets in int64, since T * H * d can pass 2**31 at long context."""
    return base + rows.to(tl.int64)[:, None] * stride + cols[None, :]


@triton.jit
def _cast(x, dtype: tl.constexpr):
    if _INTERPRETING:
        if x.dtype == tl.float32 and dtype == tl.bfloat16:
            # the interpreter truncates float32 -> bfloat16 where GPUs round to nearest even: round first, so the
            # tests see GPU rounding errors (truncation's are twice as large and all of one sign)
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _visible(offs_m, offs_n, t_k, shift, window, pin_end, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask: which (query, key) pairs are visible and the key exists.  Positions enter as two
    offsets relative to this key segment (shift = q_start - k_start, pin_end = n_pinned - k_start): every scalar
    live in the key loops costs a register in kernels that sit at the 255 limit.  Queries past the end need no
    mask: their rows are never stored, and in the backward their zero dO and delta make them contribute 0."""
    ok = offs_n[None, :] < t_k
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + shift)
    if WINDOW:
        ok = ok & ((offs_m[:, None] + shift - offs_n[None, :] < window) | (offs_n[None, :] < pin_end))
    return ok


@triton.jit
def _visible_t(offs_m, offs_n, shift, window, pin_end, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """`_visible` transposed, (BLOCK_N, BLOCK_M), built as such, without the key-existence mask: a dK/dV program
    never stores the rows of keys past the end."""
    ok = offs_n[:, None] >= 0
    if CAUSAL:
        ok = ok & (offs_n[:, None] <= offs_m[None, :] + shift)
    if WINDOW:
        ok = ok & ((offs_m[None, :] + shift - offs_n[:, None] < window) | (offs_n[:, None] < pin_end))
    return ok


@triton.jit
def _kv_block(k_base, v_base, stride_kt, stride_vt, offs_n, t_k, D: tl.constexpr, DV: tl.constexpr,
              MASKED: tl.constexpr):
    """The k, v rows offs_n; masked to the keys that exist unless the block is interior (all in range)."""
    offs_d, offs_e = tl.arange(0, D), tl.arange(0, DV)
    if MASKED:
        in_k = (offs_n < t_k)[:, None]
        k = tl.load(_tile(k_base, offs_n, stride_kt, offs_d), mask=in_k, other=0.0)
        v = tl.load(_tile(v_base, offs_n, stride_vt, offs_e), mask=in_k, other=0.0)
    else:
        k = tl.load(_tile(k_base, offs_n, stride_kt, offs_d))
        v = tl.load(_tile(v_base, offs_n, stride_vt, offs_e))
    return k, v


@triton.jit
def _nth_block(i, s1, n1, s2, n2, s3, BLOCK: tl.constexpr):
    """The start of block i of the ranges [s1, ...) (n1 blocks), [s2, ...) (n2), [s3, ...) walked one after the
    other: one loop body serves every masked range of a tile (fewer copies of it, fewer registers)."""
    return tl.where(i < n1, s1 + i * BLOCK, tl.where(i < n1 + n2, s2 + (i - n1) * BLOCK, s3 + (i - n1 - n2) * BLOCK))


@triton.jit
def _n_blocks(start, end, BLOCK: tl.constexpr):
    return tl.cdiv(tl.maximum(end - start, 0), BLOCK)


@triton.jit
def _document_block(pid, CU, n_docs, BLOCK: tl.constexpr):
    """Packed documents: programs are laid out document after document, cdiv(length, BLOCK) each.  -> the first
    row of program `pid`'s document, its length and the block's start inside it (length 0 past the last block).
    A walk over the boundaries: cheap next to the block's tiles for the few hundred documents of a window."""
    zero = pid * 0
    bos, length, start, first = zero, zero, zero, zero
    for d in range(0, n_docs):
        a = tl.load(CU + d)
        n = tl.load(CU + d + 1) - a
        blocks = tl.cdiv(n, BLOCK)
        hit = (pid >= first) & (pid < first + blocks)
        bos, length = tl.where(hit, a, bos), tl.where(hit, n, length)
        start = tl.where(hit, (pid - first) * BLOCK, start)
        first += blocks
    return bos.to(tl.int64), length, start


@triton.jit
def _key_range(m0, t_q, t_k, q_start, k_start, window, n_pinned,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Key indices that queries [m0, m0 + BLOCK_M) may see: pinned keys [0, pin_hi) and the band [lo, hi).

    lo is rounded down to a block so the two loops never visit a key twice (pin_hi <= lo)."""
    last = tl.minimum(m0 + BLOCK_M, t_q) - 1
    hi = t_k
    if CAUSAL:
        hi = tl.minimum(t_k, q_start + last - k_start + 1)
    lo = 0
    pin_hi = 0
    if WINDOW:
        lo = tl.maximum(0, q_start + m0 - window + 1 - k_start)
        lo = (lo // BLOCK_N) * BLOCK_N
        pin_hi = tl.maximum(0, tl.minimum(n_pinned - k_start, lo))
    return pin_hi, lo, hi


@triton.jit
def _query_range(n0, t_q, t_k, q_start, k_start, window, n_pinned,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Query indices [lo, hi) that may see keys [n0, n0 + BLOCK_N); lo rounded down to a query block."""
    lo = 0
    if CAUSAL:
        lo = tl.maximum(0, k_start + n0 - q_start)
        lo = (lo // BLOCK_M) * BLOCK_M
    hi = t_q
    if WINDOW:
        last = tl.minimum(n0 + BLOCK_N, t_k) - 1
        # a pinned key stays visible to every later query; otherwise the window ends W-1 positions on
        if k_start + n0 >= n_pinned:
            hi = tl.minimum(t_q, k_start + last + window - q_start)
    return lo, hi


@triton.jit
def _interior_keys(m0, lo, hi, t_k, q_start, k_start, window,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """The key blocks [int_lo, int_hi) of the band [lo, hi) that every query of block m0 sees whole: they run
    without any mask.  The blocks before (the window's edge) and after (the diagonal) keep theirs."""
    end = tl.minimum(hi, t_k)
    if CAUSAL:
        end = tl.minimum(end, q_start + m0 - k_start + 1)  # the block's last key is not after its first query
    int_hi = lo + tl.maximum(end - lo, 0) // BLOCK_N * BLOCK_N
    int_lo = lo
    if WINDOW:
        first = q_start + m0 + BLOCK_M - window - k_start  # the first key the block's last query still sees
        int_lo = tl.minimum(lo + (tl.maximum(first - lo, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N, int_hi)
    return int_lo, int_hi


@triton.jit
def _interior_queries(n0, lo, hi, t_q, t_k, q_start, k_start, window, n_pinned,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """The query blocks [int_lo, int_hi) of [lo, hi) that see every key of block n0: no mask needed."""
    hi_block = lo + (tl.maximum(hi - lo, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    int_lo = lo
    if CAUSAL:  # the block's first query is not before the key block's last key
        first = k_start + n0 + BLOCK_N - 1 - q_start
        int_lo = lo + (tl.maximum(first - lo, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    int_lo = tl.minimum(int_lo, hi_block)
    last = t_q - BLOCK_M  # the last block start whose queries all exist
    if WINDOW:
        if k_start + n0 + BLOCK_N > n_pinned:  # unless every key of the block is pinned, the window ends
            last = tl.minimum(last, k_start + n0 + window - q_start - BLOCK_M)
    n_interior = tl.where((n0 + BLOCK_N <= t_k) & (last >= int_lo), (last - int_lo) // BLOCK_M + 1, 0)
    return int_lo, tl.minimum(int_lo + n_interior * BLOCK_M, hi_block)


@triton.jit
def _join(acc, m_i, l_i, logit2, value):
    """Fold one pseudo-key per row (base-2 logit, value (BLOCK_M, DV)) into the online softmax state."""
    m_new = tl.maximum(m_i, logit2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # exp2(-inf - -inf) would be NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(logit2 - m_safe)
    return acc * alpha[:, None] + p[:, None] * value, m_new, l_i * alpha + p


# ---------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_keys(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, s1, e1, s2, e2, s3, e3,
              t_k, shift, window, pin_end, qk_scale,
              D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """The key blocks of [s1, e1), [s2, e2), [s3, e3) into the online softmax; MASKED=False for interior blocks
    (all visible, all in range)."""
    n1, n2 = _n_blocks(s1, e1, BLOCK_N), _n_blocks(s2, e2, BLOCK_N)
    for i in range(0, n1 + n2 + _n_blocks(s3, e3, BLOCK_N)):
        offs_n = _nth_block(i, s1, n1, s2, n2, s3, BLOCK_N) + tl.arange(0, BLOCK_N)
        k, v = _kv_block(k_base, v_base, stride_kt, stride_vt, offs_n, t_k, D, DV, MASKED)
        s = _dot(q, tl.trans(k), None, PRECISION) * qk_scale
        if MASKED:
            s = tl.where(_visible(offs_m, offs_n, t_k, shift, window, pin_end, CAUSAL, WINDOW),
                         s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(_cast(p, v.dtype), v, acc * alpha[:, None], PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@autotune(configs=CONFIGS, key=TUNE_KEY, prune_configs_by=PRUNE_FWD, lean=LEAN)
@triton.jit(do_not_specialize=["t_q", "t_k", "q_start", "k_start", "n_docs"])
def _fwd_kernel(Q, K, V, Sink, InitOut, InitLse, Out, Lse, CU,
                sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h, si_b, si_t, si_h,
                n_heads, group, t_q, t_k, q_start, k_start, window, n_pinned, qk_scale, n_docs,
                D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                HAS_SINK: tl.constexpr, HAS_INIT: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // n_heads).to(tl.int64), (pid_bh % n_heads).to(tl.int64)
    h_kv = h // group
    row_len = t_q  # rows of one head in Lse
    if VARLEN:  # one packed sequence: this program's document is the whole attention problem
        bos, t_q, m0 = _document_block(pid_m, CU, n_docs, BLOCK_M)
        t_k = t_q
    else:
        bos, m0 = (pid_m * 0).to(tl.int64), pid_m * BLOCK_M
    Q, K, V, Out, InitOut = Q + bos * sq_t, K + bos * sk_t, V + bos * sv_t, Out + bos * so_t, InitOut + bos * si_t
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d, offs_e = tl.arange(0, D), tl.arange(0, DV)
    in_q = offs_m < t_q
    q = tl.load(_tile(Q + b * sq_b + h * sq_h, offs_m, sq_t, offs_d), mask=in_q[:, None], other=0.0)

    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lse_rows = (b * n_heads + h) * row_len + bos + offs_m
    if HAS_INIT:
        init = tl.load(_tile(InitOut + b * si_b + h * si_h, offs_m, si_t, offs_e),
                       mask=in_q[:, None], other=0.0).to(tl.float32)
        init_lse = tl.load(InitLse + lse_rows, mask=in_q, other=float("-inf")).to(tl.float32)
        acc, m_i, l_i = _join(acc, m_i, l_i, init_lse * _LOG2E, init)
    if HAS_SINK:
        sink = tl.load(Sink + h).to(tl.float32) * _LOG2E
        acc, m_i, l_i = _join(acc, m_i, l_i, tl.zeros([BLOCK_M], dtype=tl.float32) + sink,
                              tl.zeros([BLOCK_M, DV], dtype=tl.float32))

    pin_hi, lo, hi = _key_range(m0, t_q, t_k, q_start, k_start, window, n_pinned, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    k_base, v_base = K + b * sk_b + h_kv * sk_h, V + b * sv_b + h_kv * sv_h
    int_lo, int_hi = _interior_keys(m0, lo, hi, t_k, q_start, k_start, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    shift, pin_end = q_start - k_start, n_pinned - k_start
    # Masked: the pinned keys, the window's edge, the diagonal (and ragged ends).  Then the interior, unmasked.
    acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, k_base, v_base, sk_t, sv_t, offs_m, 0, pin_hi, lo, int_lo, int_hi, hi,
                              t_k, shift, window, pin_end, qk_scale,
                              D, DV, CAUSAL, WINDOW, PRECISION, BLOCK_N, True)
    acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, k_base, v_base, sk_t, sv_t, offs_m, int_lo, int_hi, 0, 0, 0, 0,
                              t_k, shift, window, pin_end, qk_scale,
                              D, DV, CAUSAL, WINDOW, PRECISION, BLOCK_N, False)

    # Rows that saw nothing at all (l = 0) get out 0 and lse -inf.
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
    tl.store(_tile(Out + b * so_b + h * so_h, offs_m, so_t, offs_e), _cast(out, Out.dtype.element_ty),
             mask=in_q[:, None])
    tl.store(Lse + lse_rows, lse, mask=in_q)


# ---------------------------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["t_q"])
def _delta_kernel(Out, DOut, DLse, Delta, so_b, so_t, so_h, sd_b, sd_t, sd_h, n_heads, t_q,
                  DV: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) - dlse: the part of dS shared by every key of a query."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // n_heads).to(tl.int64), (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, DV)
    in_q = offs_m < t_q
    o = tl.load(_tile(Out + b * so_b + h * so_h, offs_m, so_t, offs_e), mask=in_q[:, None], other=0.0)
    do = tl.load(_tile(DOut + b * sd_b + h * sd_h, offs_m, sd_t, offs_e), mask=in_q[:, None],
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = (b * n_heads + h) * t_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLse + rows, mask=in_q, other=0.0).to(tl.float32)
    tl.store(Delta + rows, delta, mask=in_q)


@triton.jit
def _probs(q, k, lse2, offs_m, offs_n, t_k, shift, window, pin_end, qk_scale,
           CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """The final softmax probabilities of a (query block, key block) tile, recomputed from the saved lse."""
    s = _dot(q, tl.trans(k), None, PRECISION) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(_visible(offs_m, offs_n, t_k, shift, window, pin_end, CAUSAL, WINDOW), p, 0.0)
    return p


@triton.jit
def _load_rows(Lse, Delta, rows, in_q):
    lse = tl.load(Lse + rows, mask=in_q, other=0.0)
    # a row with lse = -inf saw nothing; any finite stand-in works since all its probabilities are masked to 0
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * _LOG2E)
    return lse2, tl.load(Delta + rows, mask=in_q, other=0.0)


@triton.jit
def _dkv_queries(dk, dv, k, v, q_base, do_base, dq_base, Lse, Delta, rows, sq_t, sd_t, sdq_t, offs_n,
                 s1, e1, s2, e2, t_q, shift, window, pin_end, qk_scale,
                 D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """dK, dV += the query blocks of [s1, e1), [s2, e2) of one head; MASKED=False for interior blocks.  Scores are
    kept transposed (keys x queries), with q^T loaded as such, so no tile is transposed in registers.  With
    ATOMIC_DQ each tile's dQ share is added in place to a float32 buffer (FlashAttention-2's backward)."""
    offs_d, offs_e = tl.arange(0, D), tl.arange(0, DV)
    n1 = _n_blocks(s1, e1, BLOCK_M)
    for i in range(0, n1 + _n_blocks(s2, e2, BLOCK_M)):
        offs_m = _nth_block(i, s1, n1, s2, 0, s2, BLOCK_M) + tl.arange(0, BLOCK_M)
        q_t = q_base + offs_d[:, None] + offs_m.to(tl.int64)[None, :] * sq_t
        if MASKED:
            in_q = offs_m < t_q
            q_t = tl.load(q_t, mask=in_q[None, :], other=0.0)
            do = tl.load(_tile(do_base, offs_m, sd_t, offs_e), mask=in_q[:, None], other=0.0)
            lse2, delta = _load_rows(Lse, Delta, rows + offs_m, in_q)
        else:
            q_t = tl.load(q_t)
            do = tl.load(_tile(do_base, offs_m, sd_t, offs_e))
            lse2, delta = _load_rows(Lse, Delta, rows + offs_m, offs_m >= 0)
        p_t = tl.exp2(_dot(k, q_t, None, PRECISION) * qk_scale - lse2[None, :])
        if MASKED:
            p_t = tl.where(_visible_t(offs_m, offs_n, shift, window, pin_end, CAUSAL, WINDOW),
                           p_t, 0.0)
        dv = _dot(_cast(p_t, do.dtype), do, dv, PRECISION)
        ds_t = p_t * (_dot(v, tl.trans(do), None, PRECISION) - delta[None, :])
        dk = _dot(_cast(ds_t, q_t.dtype), tl.trans(q_t), dk, PRECISION)
        if ATOMIC_DQ:
            dq = _dot(tl.trans(_cast(ds_t, k.dtype)), k, None, PRECISION)
            dq_ptrs = _tile(dq_base, offs_m, sdq_t, offs_d)
            if MASKED:
                tl.atomic_add(dq_ptrs, dq, mask=(offs_m < t_q)[:, None], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@autotune(configs=BWD_KV_CONFIGS, key=BWD_KV_KEY, prune_configs_by=PRUNE_BWD_KV, lean=LEAN_BWD_KV)
@triton.jit(do_not_specialize=["t_q", "t_k", "q_start", "k_start", "n_docs"])
def _bwd_kv_kernel(Q, K, V, DOut, Lse, Delta, DK, DV_, DQAcc, CU,
                   sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sd_b, sd_t, sd_h,
                   sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h, sdq_b, sdq_t, sdq_h,
                   n_heads, group, t_q, t_k, q_start, k_start, window, n_pinned, qk_scale, scale, n_docs,
                   D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, VARLEN: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block of one k/v head, summed over the G query heads sharing it (and with ATOMIC_DQ
    the unscaled dQ, added into DQAcc)."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    n_kv = n_heads // group
    b, h_kv = (pid_bh // n_kv).to(tl.int64), (pid_bh % n_kv).to(tl.int64)
    row_len = t_q
    if VARLEN:
        bos, t_k, n0 = _document_block(pid_n, CU, n_docs, BLOCK_N)
        t_q = t_k
    else:
        bos, n0 = (pid_n * 0).to(tl.int64), pid_n * BLOCK_N
    Q, K, V, DOut = Q + bos * sq_t, K + bos * sk_t, V + bos * sv_t, DOut + bos * sd_t
    DK, DV_, DQAcc = DK + bos * sdk_t, DV_ + bos * sdv_t, DQAcc + bos * sdq_t
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d, offs_e = tl.arange(0, D), tl.arange(0, DV)
    in_k = (offs_n < t_k)[:, None]
    k = tl.load(_tile(K + b * sk_b + h_kv * sk_h, offs_n, sk_t, offs_d), mask=in_k, other=0.0)
    v = tl.load(_tile(V + b * sv_b + h_kv * sv_h, offs_n, sv_t, offs_e), mask=in_k, other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV], dtype=tl.float32)

    lo, hi = _query_range(n0, t_q, t_k, q_start, k_start, window, n_pinned, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    int_lo, int_hi = _interior_queries(n0, lo, hi, t_q, t_k, q_start, k_start, window, n_pinned, BLOCK_M, BLOCK_N,
                                       CAUSAL, WINDOW)
    shift, pin_end = q_start - k_start, n_pinned - k_start
    for g in range(group):
        h = h_kv * group + g
        q_base, do_base = Q + b * sq_b + h * sq_h, DOut + b * sd_b + h * sd_h
        dq_base = DQAcc + b * sdq_b + h * sdq_h
        rows = (b * n_heads + h) * row_len + bos
        # Masked: the diagonal and the window's edge (and ragged ends).  Then the interior, unmasked.
        dk, dv = _dkv_queries(dk, dv, k, v, q_base, do_base, dq_base, Lse, Delta, rows, sq_t, sd_t, sdq_t, offs_n,
                              lo, int_lo, int_hi, hi, t_q, shift, window, pin_end, qk_scale, D, DV, CAUSAL,
                              WINDOW, PRECISION, BLOCK_M, True, ATOMIC_DQ)
        dk, dv = _dkv_queries(dk, dv, k, v, q_base, do_base, dq_base, Lse, Delta, rows, sq_t, sd_t, sdq_t, offs_n,
                              int_lo, int_hi, 0, 0, t_q, shift, window, pin_end, qk_scale, D, DV, CAUSAL, WINDOW,
                              PRECISION, BLOCK_M, False, ATOMIC_DQ)
    tl.store(_tile(DK + b * sdk_b + h_kv * sdk_h, offs_n, sdk_t, offs_d),
             _cast(dk * scale, DK.dtype.element_ty), mask=in_k)
    tl.store(_tile(DV_ + b * sdv_b + h_kv * sdv_h, offs_n, sdv_t, offs_e),
             _cast(dv, DV_.dtype.element_ty), mask=in_k)


@triton.jit
def _dq_keys(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, s1, e1, s2, e2, s3, e3,
             t_k, shift, window, pin_end, qk_scale,
             D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """dQ += the key blocks of [s1, e1), [s2, e2), [s3, e3), as `_fwd_keys` walks them."""
    n1, n2 = _n_blocks(s1, e1, BLOCK_N), _n_blocks(s2, e2, BLOCK_N)
    for i in range(0, n1 + n2 + _n_blocks(s3, e3, BLOCK_N)):
        offs_n = _nth_block(i, s1, n1, s2, n2, s3, BLOCK_N) + tl.arange(0, BLOCK_N)
        k, v = _kv_block(k_base, v_base, stride_kt, stride_vt, offs_n, t_k, D, DV, MASKED)
        p = _probs(q, k, lse2, offs_m, offs_n, t_k, shift, window, pin_end, qk_scale,
                   CAUSAL, WINDOW, PRECISION, MASKED)
        dp = _dot(do, tl.trans(v), None, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot(_cast(ds, k.dtype), k, dq, PRECISION)
    return dq


@autotune(configs=BWD_Q_CONFIGS, key=TUNE_KEY, prune_configs_by=PRUNE_BWD_Q, lean=LEAN_BWD_Q)
@triton.jit(do_not_specialize=["t_q", "t_k", "q_start", "k_start", "n_docs"])
def _bwd_q_kernel(Q, K, V, DOut, Lse, Delta, DQ, CU,
                  sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sd_b, sd_t, sd_h, sdq_b, sdq_t, sdq_h,
                  n_heads, group, t_q, t_k, q_start, k_start, window, n_pinned, qk_scale, scale, n_docs,
                  D: tl.constexpr, DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                  PRECISION: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block: the same key loops as the forward."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // n_heads).to(tl.int64), (pid_bh % n_heads).to(tl.int64)
    h_kv = h // group
    row_len = t_q
    if VARLEN:
        bos, t_q, m0 = _document_block(pid_m, CU, n_docs, BLOCK_M)
        t_k = t_q
    else:
        bos, m0 = (pid_m * 0).to(tl.int64), pid_m * BLOCK_M
    Q, K, V, DOut, DQ = Q + bos * sq_t, K + bos * sk_t, V + bos * sv_t, DOut + bos * sd_t, DQ + bos * sdq_t
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d, offs_e = tl.arange(0, D), tl.arange(0, DV)
    in_q = (offs_m < t_q)[:, None]
    q = tl.load(_tile(Q + b * sq_b + h * sq_h, offs_m, sq_t, offs_d), mask=in_q, other=0.0)
    do = tl.load(_tile(DOut + b * sd_b + h * sd_h, offs_m, sd_t, offs_e), mask=in_q, other=0.0)
    lse2, delta = _load_rows(Lse, Delta, (b * n_heads + h) * row_len + bos + offs_m, offs_m < t_q)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    pin_hi, lo, hi = _key_range(m0, t_q, t_k, q_start, k_start, window, n_pinned, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    k_base, v_base = K + b * sk_b + h_kv * sk_h, V + b * sv_b + h_kv * sv_h
    int_lo, int_hi = _interior_keys(m0, lo, hi, t_k, q_start, k_start, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    shift, pin_end = q_start - k_start, n_pinned - k_start
    dq = _dq_keys(dq, q, do, lse2, delta, k_base, v_base, sk_t, sv_t, offs_m, 0, pin_hi, lo, int_lo, int_hi, hi,
                  t_k, shift, window, pin_end, qk_scale, D, DV, CAUSAL, WINDOW, PRECISION, BLOCK_N,
                  True)
    dq = _dq_keys(dq, q, do, lse2, delta, k_base, v_base, sk_t, sv_t, offs_m, int_lo, int_hi, 0, 0, 0, 0,
                  t_k, shift, window, pin_end, qk_scale, D, DV, CAUSAL, WINDOW, PRECISION, BLOCK_N,
                  False)
    tl.store(_tile(DQ + b * sdq_b + h * sdq_h, offs_m, sdq_t, offs_d),
             _cast(dq * scale, DQ.dtype.element_ty), mask=in_q)


# ---------------------------------------------------------------------------------------------- launchers
def _flags(q: torch.Tensor, spec: Spec) -> dict:
    return {"D": q.shape[-1], "CAUSAL": spec.causal, "WINDOW": spec.window is not None,
            "PRECISION": _precision(q.dtype)}


def _launcher(traced: bool):
    """Kernels launched from inside the registered ops go through `traceable` (torch.compile sees them); direct
    callers (ring attention's own autograd) launch them plainly."""
    return traceable if traced else (lambda kernel: kernel)


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Spec, sink: torch.Tensor | None = None,
                  init_out: torch.Tensor | None = None, init_lse: torch.Tensor | None = None, *,
                  traced: bool = False, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel, without autograd.  q (B, Tq, H, d), k/v (B, Tk, Hkv, d/dv) -> out (B, Tq, H, dv),
    lse (B, H, Tq) float32.  With (init_out, init_lse) the keys merge into that partial result (out then takes
    init_out's dtype, so a float32 accumulator stays float32); the sink (H,) joins the denominator.
    `cu_seqlens` (int32 on q's device; batch 1, queries = keys): packed documents, each its own problem, every
    document's blocks in the one launch."""
    _check(q, k, v)
    q, k, v = contiguous_last(q), contiguous_last(k), contiguous_last(v)
    b, t_q, h, _ = q.shape
    t_k, h_kv, dv = k.shape[1], k.shape[2], v.shape[-1]
    out_dtype = q.dtype if init_out is None else init_out.dtype
    out = output_buffer((b, t_q, h, dv), out_dtype, q.device)
    lse = output_buffer((b, h, t_q), torch.float32, q.device)
    if out.numel() == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    if init_out is not None:
        init_out, init_lse = contiguous_last(init_out), init_lse.float().contiguous()
    # unused pointers still need a tensor; their loads are compiled out
    sink_arg = sink.contiguous() if sink is not None else lse
    n_docs = 0 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    grid = lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]) + n_docs, b * h)  # noqa: E731  (+ each document's tail)
    _launcher(traced)(_fwd_kernel)[grid](
        q, k, v, sink_arg, out if init_out is None else init_out, lse if init_lse is None else init_lse, out, lse,
        lse if cu_seqlens is None else cu_seqlens,
        *strides3(q), *strides3(k), *strides3(v), *strides3(out), *strides3(out if init_out is None else init_out),
        h, h // h_kv, t_q, t_k, *spec.args(), spec.scale * LOG2E, n_docs,
        DV=dv, HAS_SINK=sink is not None, HAS_INIT=init_out is not None, VARLEN=cu_seqlens is not None,
        **_flags(q, spec))
    return out, lse


def flash_delta(out: torch.Tensor, d_out: torch.Tensor, d_lse: torch.Tensor | None = None, *,
                traced: bool = False) -> torch.Tensor:
    """delta = rowsum(dO * O) - dlse, (B, H, Tq) float32, from out/d_out (B, Tq, H, dv) and d_lse (B, H, Tq)."""
    out, d_out = contiguous_last(out), contiguous_last(d_out)
    b, t_q, h, dv = out.shape
    delta = output_buffer((b, h, t_q), torch.float32, out.device)
    if delta.numel() == 0:
        return delta
    d_lse = d_lse.contiguous() if d_lse is not None else None
    block = 64
    _launcher(traced)(_delta_kernel)[(triton.cdiv(t_q, block), b * h)](
        out, d_out, delta if d_lse is None else d_lse, delta, *strides3(out), *strides3(d_out), h, t_q,
        DV=dv, HAS_DLSE=d_lse is not None, BLOCK_M=block)
    return delta


def flash_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d_out: torch.Tensor, delta: torch.Tensor,
                   lse: torch.Tensor, spec: Spec, grad_dtype: torch.dtype | None = None, *, traced: bool = False,
                   atomic: bool | None = None, cu_seqlens: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one (queries, keys) pair given the *final* lse (every key, sink and merged partial) and
    delta = rowsum(dO * O) - dlse.  Gradients come in `grad_dtype` (default: the input dtype); pass float32
    when summing the gradients of several key segments.  `atomic`: dQ added atomically by the dK/dV kernel
    instead of computed by its own kernel (default: `hylo.kernels.ops.set_backward_dq`)."""
    _check(q, k, v)
    q, k, v, d_out = contiguous_last(q), contiguous_last(k), contiguous_last(v), contiguous_last(d_out)
    lse, delta = lse.float().contiguous(), delta.float().contiguous()
    b, t_q, h, _ = q.shape
    t_k, h_kv = k.shape[1], k.shape[2]
    grad_dtype = q.dtype if grad_dtype is None else grad_dtype
    dq = output_buffer(q.shape, grad_dtype, q.device)
    dk, dv = output_buffer(k.shape, grad_dtype, q.device), output_buffer(v.shape, grad_dtype, q.device)
    if t_q == 0 or t_k == 0 or b * h == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    n_docs = 0 if cu_seqlens is None else cu_seqlens.shape[0] - 1
    common = (h, h // h_kv, t_q, t_k, *spec.args(), spec.scale * LOG2E, spec.scale, n_docs)
    flags = {"DV": v.shape[-1], "VARLEN": cu_seqlens is not None, **_flags(q, spec)}
    docs = lse if cu_seqlens is None else cu_seqlens
    atomic = atomic_dq() if atomic is None else atomic
    dq_sum = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic else dk  # unused unless atomic
    _launcher(traced)(_bwd_kv_kernel)[lambda meta: (triton.cdiv(t_k, meta["BLOCK_N"]) + n_docs, b * h_kv)](
        q, k, v, d_out, lse, delta, dk, dv, dq_sum, docs, *strides3(q), *strides3(k), *strides3(v),
        *strides3(d_out), *strides3(dk), *strides3(dv), *strides3(dq_sum), *common, ATOMIC_DQ=atomic, **flags)
    if atomic:
        return dq.copy_(dq_sum.mul_(spec.scale)), dk, dv
    _launcher(traced)(_bwd_q_kernel)[lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]) + n_docs, b * h)](
        q, k, v, d_out, lse, delta, dq, docs,
        *strides3(q), *strides3(k), *strides3(v), *strides3(d_out), *strides3(dq), *common, **flags)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------- autograd
def _weight(lse_part: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(lse_part - lse): the share of a partial result in the total, 0 where neither saw anything."""
    return torch.exp(lse_part - lse.masked_fill(torch.isneginf(lse), 0.0)).masked_fill(torch.isneginf(lse_part), 0.0)


# Registered with torch.library (hylo::flash_attention_forward / _backward): one op each under
# torch.compile(fullgraph=True); autograd joins them.  `window` 0 means no window.
def _spec(scale: float, causal: bool, window: int, n_pinned: int, q_start: int, k_start: int) -> Spec:
    return Spec(scale, causal, window or None, n_pinned, q_start, k_start)


@kernel_op("hylo::flash_attention_forward")
def _flash_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor | None,
                      init_out: torch.Tensor | None, init_lse: torch.Tensor | None, scale: float, causal: bool,
                      window: int, n_pinned: int, q_start: int, k_start: int, cu_seqlens: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _spec(scale, causal, window, n_pinned, q_start, k_start)
    return flash_forward(q, k, v, spec, sink, init_out, init_lse, traced=True, cu_seqlens=cu_seqlens)


@_flash_forward_op.register_fake
def _(q, k, v, sink, init_out, init_lse, scale, causal, window, n_pinned, q_start, k_start, cu_seqlens):
    b, t_q, h, _ = q.shape
    out_dtype = q.dtype if init_out is None else init_out.dtype
    return q.new_empty((b, t_q, h, v.shape[-1]), dtype=out_dtype), q.new_empty((b, h, t_q), dtype=torch.float32)


@kernel_op("hylo::flash_attention_backward")
def _flash_backward_op(d_out: torch.Tensor, d_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool, window: int,
                       n_pinned: int, q_start: int, k_start: int, cu_seqlens: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv, and delta = rowsum(dO * O) - dlse (B, H, Tq) fp32, which the sink's gradient reads."""
    spec = _spec(scale, causal, window, n_pinned, q_start, k_start)
    delta = flash_delta(out, d_out, d_lse, traced=True)
    dq, dk, dv = flash_backward(q, k, v, d_out, delta, lse, spec, traced=True, cu_seqlens=cu_seqlens)
    return dq, dk, dv, delta


@_flash_backward_op.register_fake
def _(d_out, d_lse, q, k, v, out, lse, scale, causal, window, n_pinned, q_start, k_start, cu_seqlens):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(lse)


def _flash_setup(ctx, inputs, output):
    q, k, v, sink, init_out, init_lse, *constants, cu_seqlens = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, sink, init_out, init_lse, out, lse, cu_seqlens)
    ctx.constants = constants


def _flash_grads(ctx, d_out, d_lse):
    q, k, v, sink, init_out, init_lse, out, lse, cu_seqlens = ctx.saved_tensors
    d_out = torch.zeros_like(out) if d_out is None else d_out
    dq, dk, dv, delta = _flash_backward_op(d_out, d_lse, q, k, v, out, lse, *ctx.constants, cu_seqlens)
    d_sink = d_init_out = d_init_lse = None
    if sink is not None and ctx.needs_input_grad[3]:
        # the sink is a key with logit `sink` and value 0: dS = p_sink * (0 - delta)
        d_sink = -(_weight(sink.float()[None, :, None], lse) * delta).sum(dim=(0, 2)).to(sink.dtype)
    if init_out is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5]):
        # the partial result is a key with logit init_lse and value init_out
        p = _weight(init_lse.float(), lse)
        d_init_out = (p.transpose(1, 2)[..., None] * d_out.float()).to(init_out.dtype)
        d_init_lse = (p * ((d_out.float() * init_out.float()).sum(-1).transpose(1, 2) - delta)).to(init_lse.dtype)
    return dq, dk, dv, d_sink, d_init_out, d_init_lse, None, None, None, None, None, None, None


_flash_forward_op.register_autograd(_flash_grads, setup_context=_flash_setup)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                     window: int | None = None, sink: torch.Tensor | None = None, scale: float | None = None,
                     n_pinned: int = 0, q_start: int | None = None, k_start: int = 0,
                     init: tuple[torch.Tensor, torch.Tensor] | None = None, cu_seqlens: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable flash attention.  q (B, Tq, H, d); k, v (B, Tk, Hkv, d/dv) -> out (B, Tq, H, dv) in q's
    dtype, lse (B, H, Tq) float32.

    Query i sits at position q_start + i (default: the last Tq positions, k_start + Tk - Tq), key j at
    k_start + j.  `init=(out, lse)` merges these keys into a partial result over other keys (out in its dtype);
    the sink, if given, should join exactly one of the partial results that are merged.  `cu_seqlens` (checked
    by the caller; batch 1, queries = keys, no `init`): packed documents, all in one launch per kernel, each
    document its own attention problem (its own causal mask, window, pinned tokens and sink).
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value heads")
    spec = make_spec(q, k, causal=causal, window=window, scale=scale, n_pinned=n_pinned, q_start=q_start,
                     k_start=k_start)
    init_out, init_lse = (None, None) if init is None else init
    if cu_seqlens is not None:
        if init is not None or q.shape[0] != 1 or q.shape[1] != k.shape[1]:
            raise ValueError("packed documents take one sequence (batch 1) of queries = keys, without `init`")
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32, non_blocking=True)
    return _flash_forward_op(q, k, v, sink, init_out, init_lse, spec.scale, spec.causal, spec.window or 0,
                             spec.n_pinned, spec.q_start, spec.k_start, cu_seqlens)


def merge(out: torch.Tensor, lse: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial results over disjoint key sets: out (B, T, H, dv), lse (B, H, T) each.  Differentiable;
    rows neither part saw stay out 0, lse -inf."""
    total = torch.logaddexp(lse, lse2)
    w, w2 = _weight(lse, total), _weight(lse2, total)
    return out * w.transpose(1, 2)[..., None] + out2 * w2.transpose(1, 2)[..., None], total
