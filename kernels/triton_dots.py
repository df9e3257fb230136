"""Matrix products and rounding shared by the Triton kernels.

`dot(a, b, acc)` multiplies two tiles of one dtype with float32 accumulation: 16-bit operands in one pass on tensor
cores (what fla and FlashAttention do: a float32 tile — scores, a state — is rounded to the inputs' dtype once
before its product), float32 operands in IEEE float32 (no TF32), so float32 inputs match a float64 reference to
~1e-7.

Two CPU-interpreter (triton 3.9) workarounds, compiled out on GPUs: the interpreter multiplies bfloat16 tiles as
their raw 16-bit patterns, so `dot` hands it float32 operands (the GPU's arithmetic too: a product of two 16-bit
floats is exact in float32, which accumulates); and it truncates float32 -> bfloat16 where GPUs round to nearest
even, so `round_to` rounds first (the outputs' error would otherwise double).  TRITON_INTERPRET must be set before
this module is imported, as for every kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hylo.kernels.triton_support import interpreting

_INTERPRETED = tl.constexpr(interpreting())


@triton.jit
def dot(a, b, acc=None):
    """a @ b (+ acc, accumulated in place), both of one dtype, with float32 accumulation; float32 operands in IEEE
    precision."""
    if _INTERPRETED:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def round_to(x, DT: tl.constexpr):
    """x.to(DT), rounding to nearest even."""
    if _INTERPRETED:
        if DT == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DT)
