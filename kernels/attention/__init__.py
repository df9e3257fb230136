"""Softmax attention with grouped-query heads, sliding windows, learned sinks and the log-sum-exp.

Window convention: `window=W` means each query sees itself and the W-1 tokens before it (W keys in all);
`window=1` is each token alone, `window>=T` is full causal attention.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from hylo.kernels.attention.chunk import chunk_attention
from hylo.kernels.attention.dq_mode import atomic_dq, set_backward_dq
from hylo.kernels.attention.naive import naive_attention
from hylo.kernels.attention.step import attention_prefill, attention_step
from hylo.kernels.dispatch import choose_backend, triton_fits
from hylo.kernels.varlen import document_bounds, packed, split_documents

BACKENDS = ("naive", "chunk", "triton", "sdpa", "flash")

__all__ = ["attention", "attention_prefill", "attention_step", "naive_attention", "chunk_attention",
           "set_backward_dq", "atomic_dq"]

@lru_cache(maxsize=8)
def _window_mask(t: int, window: int, device: torch.device) -> torch.Tensor:
    i, j = torch.arange(t, device=device)[:, None], torch.arange(t, device=device)[None, :]
    return (j <= i) & (i - j < window)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, causal: bool,
                 sink: torch.Tensor | None, n_pinned: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects (batch, seq, heads, dim) tensors, got q{tuple(q.shape)} "
                         f"k{tuple(k.shape)} v{tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)} do not fit together")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value heads")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"more queries ({q.shape[1]}) than keys ({k.shape[1]}): queries are the last positions")
    if window is not None and (window < 1 or not causal):
        raise ValueError(f"window={window} needs causal=True and window >= 1")
    if sink is not None and sink.shape != (q.shape[2],):
        raise ValueError(f"sink must have shape (heads,) = ({q.shape[2]},), got {tuple(sink.shape)}")
    if n_pinned < 0:
        raise ValueError(f"n_pinned={n_pinned} must be >= 0")


def _triton_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    from hylo.kernels.attention.triton import supported  # imports triton, which CPU-only installs may lack

    return supported(q, k, v)


def flash_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `auto` may take the flash backend (ring attention asks too); a torch whose FlashAttention ops fail
    their probe is said once."""
    from hylo.kernels.attention.flash import flash_problem

    problem = flash_problem(q, k, v)
    if problem and q.is_cuda and not torch.compiler.is_compiling():
        say_flash_problem(problem)
    return problem is None


_SAID: set[str] = set()


def say_flash_problem(problem: str) -> None:
    """One note per reason: auto runs the Triton kernels instead."""
    if problem not in _SAID:
        _SAID.add(problem)
        print(f"[hylo] attention: not using the flash backend ({problem}); the Triton kernels run instead",
              flush=True)


def _flash(q, k, v, *, causal, window, sink, scale, n_pinned, bounds=None):
    from hylo.kernels.attention.flash import flash_attention, flash_problem

    if problem := flash_problem(q, k, v):
        raise ValueError(f"attention: backend='flash' cannot take these inputs: {problem}")
    return flash_attention(q, k, v, causal=causal, window=window, sink=sink, scale=scale, n_pinned=n_pinned,
                           bounds=bounds)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None,
          scale: float | None) -> torch.Tensor:
    mask = None if window is None else _window_mask(q.shape[1], window, q.device)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                          is_causal=causal and mask is None, scale=scale,
                                          enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, window: int | None = None,
              sink: torch.Tensor | None = None, scale: float | None = None, return_lse: bool = False,
              n_pinned: int = 0, backend: str = "auto", cu_seqlens: torch.Tensor | None = None
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention.  q (B, Tq, H, d); k, v (B, Tk, Hkv, d) with H a multiple of Hkv; Tq <= Tk, the queries
    being the last Tq positions.  Returns out (B, Tq, H, d), and lse (B, H, Tq) with `return_lse=True`.

    window    each query sees itself and the window-1 keys before it (None: all earlier keys)
    sink      (H,) learned logits that join each query's softmax denominator and carry no value
    n_pinned  with a window, the first n_pinned tokens stay visible to every query (StreamingLLM)
    cu_seqlens  packed documents (batch 1, kernels/varlen.py): no query sees another document's keys, each
              document's softmax has its own sink, window and pinned tokens
    backend   "naive" (quadratic oracle) | "chunk" (blockwise PyTorch) | "triton" (our flash kernels) | "sdpa"
              (torch's SDPA, plain attention only) | "flash" (the FlashAttention kernels torch ships, sinks, pinned
              tokens, documents and lse composed around them: flash.py) | "auto" (kernels/dispatch.py: SDPA for
              plain attention, else flash for 16-bit CUDA tensors where torch's ops pass their probe, else Triton
              for CUDA tensors it takes, else chunk)
    """
    check_inputs(q, k, v, window, causal, sink, n_pinned)
    cu_seqlens = packed(cu_seqlens, q, "attention")
    if cu_seqlens is not None:
        if q.shape[1] != k.shape[1]:
            raise ValueError("attention: with cu_seqlens the queries and keys are the same packed sequence")
        # The flash kernels take every document in one launch; SDPA (plain attention under "auto") and the
        # PyTorch paths run each document on its own.
        plain = sink is None and not return_lse and n_pinned == 0
        # (on a GPU plain attention too takes flash or Triton: one call for every document, not SDPA per document)
        chosen = choose_backend("attention", backend, BACKENDS, (q, k, v), triton_ok=lambda: _triton_takes(q, k, v),
                                sdpa_ok=plain and not q.is_cuda, flash_ok=lambda: flash_usable(q, k, v))
        if chosen == "flash":  # every document in one call (FlashAttention's varlen layout)
            out, lse = _flash(q, k, v, causal=causal, window=window, sink=sink, scale=scale, n_pinned=n_pinned,
                              bounds=document_bounds(cu_seqlens, q, "attention"))
            return (out, lse) if return_lse else out
        if chosen == "triton":
            from hylo.kernels.attention.triton import triton_attention

            out, lse = triton_attention(q, k, v, causal=causal, window=window, sink=sink, scale=scale,
                                        n_pinned=n_pinned, cu_seqlens=cu_seqlens)
            return (out, lse) if return_lse else out
        parts = [attention(qd, kd, vd, causal=causal, window=window, sink=sink, scale=scale, return_lse=return_lse,
                           n_pinned=n_pinned, backend=backend)
                 for qd, kd, vd in split_documents(cu_seqlens, "attention", q, k, v)]
        if not return_lse:
            return torch.cat(parts, dim=1)
        return torch.cat([o for o, _ in parts], dim=1), torch.cat([lse for _, lse in parts], dim=2)
    if window is not None and window >= k.shape[1]:
        window = None  # the window covers everything: plain causal attention
    plain = sink is None and not return_lse and n_pinned == 0 and q.shape[1] == k.shape[1]
    # SDPA takes plain attention; with a window only on GPUs where the Triton kernels cannot take the inputs (as a
    # (T, T) mask) — on CPUs the blockwise path is O(T*W).
    sdpa_ok = plain and (window is None or (q.is_cuda and not (triton_fits(q, k, v) and _triton_takes(q, k, v))))
    backend = choose_backend("attention", backend, BACKENDS, (q, k, v), triton_ok=lambda: _triton_takes(q, k, v),
                             sdpa_ok=sdpa_ok, flash_ok=lambda: flash_usable(q, k, v))
    if backend == "sdpa":
        if not plain:
            raise ValueError("backend='sdpa' takes plain attention only: no sink, lse, pinned tokens, or fewer "
                             "queries than keys")
        return _sdpa(q, k, v, causal, window, scale)
    if backend == "flash":
        out, lse = _flash(q, k, v, causal=causal, window=window, sink=sink, scale=scale, n_pinned=n_pinned)
    elif backend == "naive":
        out, lse = naive_attention(q, k, v, causal=causal, window=window, sink=sink, scale=scale, n_pinned=n_pinned)
    elif backend == "triton":
        from hylo.kernels.attention.triton import triton_attention  # imports triton, which CPU-only installs may lack

        out, lse = triton_attention(q, k, v, causal=causal, window=window, sink=sink, scale=scale,
                                    n_pinned=n_pinned)
    else:
        out, lse = chunk_attention(q, k, v, causal=causal, window=window, sink=sink, scale=scale,
                                   n_pinned=n_pinned)
    return (out, lse) if return_lse else out
