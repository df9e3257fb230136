"""One rule for every op: which path runs (`backend=`) and in which precision it computes.

  naive   the oracle: plain PyTorch, quadratic or step by step, exact in float64
  chunk   the blockwise PyTorch path: any device, any dtype, and what `auto` falls back to
  triton  the Triton kernels: CUDA tensors, or any tensors with TRITON_INTERPRET=1 (CPU, exact, slow)
  sdpa    torch's scaled_dot_product_attention, for the attention calls it can express
  flash   the FlashAttention kernels torch ships (attention: kernels/attention/flash.py), with sinks, pinned tokens
          and the lse composed around them
  auto    sdpa where the op offers it and the call fits, else flash where the op offers it for 16-bit CUDA tensors
          and the installed torch passes its probe, else triton where the kernels take the inputs (CUDA tensors of
          one 16/32-bit dtype, triton installed), else chunk

Asking for a backend by name gets exactly that backend or an error, never a substitute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hylo.kernels.triton_support import require_triton, triton

LOW_PRECISION = (torch.float16, torch.bfloat16)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (sums, states and softmax statistics), otherwise the dtype itself (float64 stays
    float64 for the oracle tests)."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(compute_dtype(x.dtype))


def triton_fits(*tensors: torch.Tensor) -> bool:
    """Whether `auto` takes the Triton kernels: CUDA tensors of one dtype they handle, triton installed."""
    first = tensors[0]
    return (triton is not None and first.is_cuda and first.dtype in TRITON_DTYPES
            and all(t.dtype == first.dtype for t in tensors))


def check_backend(op: str, backend: str, offered: tuple[str, ...]) -> None:
    if backend != "auto" and backend not in offered:
        raise ValueError(f"backend='{backend}' is not one of {['auto', *offered]} for {op}")


def choose_backend(op: str, backend: str, offered: tuple[str, ...], tensors: tuple[torch.Tensor, ...], *,
                   triton_ok: Callable[[], bool] = lambda: True, sdpa_ok: bool = False,
                   flash_ok: Callable[[], bool] = lambda: False) -> str:
    """The backend `op` runs: `backend` itself when named (it must be one the op offers), else auto's choice.
    `triton_ok` adds the op's own limits (head dims, gradients it cannot give); `sdpa_ok` says SDPA can express
    this call; `flash_ok` that the vendor flash kernels take it."""
    check_backend(op, backend, offered)
    if backend == "auto":
        if "sdpa" in offered and sdpa_ok:
            return "sdpa"
        if "flash" in offered and tensors[0].is_cuda and tensors[0].dtype in LOW_PRECISION and flash_ok():
            return "flash"
        if "triton" in offered and triton_fits(*tensors) and triton_ok():
            return "triton"
        return "chunk"
    if backend == "triton":
        require_triton(*tensors)
    return backend
