"""Matrix products and rounding shared by the linear-attention Triton kernels (kernels/lightning, kernels/based).

`mm(a, b, DT)` takes operands that are each float32 or DT, the kernel's input dtype, and accumulates in float32.
With 16-bit inputs, a float32 operand (a score tile, a state, a decayed key) goes in as hi + lo, two DT tiles that
together hold ~16 significant bits: rounding it to DT once costs ~2^-9 relative per element, several times the
rounding of the result itself.  That is 2 tensor-core products for float32 @ DT and 3 for float32 @ float32.
float32 inputs use IEEE float32 products (no TF32), so they match a float64 reference to ~1e-7.
(With float16 inputs the hi part must fit float16's range, 65504: states larger than that overflow.)

Two CPU-interpreter (triton 3.9) workarounds, compiled out on GPUs: the interpreter multiplies bfloat16 tiles as
their raw 16-bit patterns, so `dot` hands it float32 operands (the GPU's arithmetic too: a product of two 16-bit
floats is exact in float32, which accumulates); and it truncates float32 -> bfloat16 where GPUs round to nearest
even, so `round_to` rounds first (the outputs' error would otherwise double).  TRITON_INTERPRET must be set before
this module is imported, as for every kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.triton_support import interpreting

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
def mm(a, b, DT: tl.constexpr):
    """a @ b in float32 for operands that are each float32 or DT (see the module docstring)."""
    if DT == tl.float32:
        out = dot(a, b)
    else:
        a_hi = a.to(DT)
        b_hi = b.to(DT)
        out = dot(a_hi, b_hi)
        if a.dtype == tl.float32:
            out += dot((a - a_hi.to(tl.float32)).to(DT), b_hi)
        if b.dtype == tl.float32:
            out += dot(a_hi, (b - b_hi.to(tl.float32)).to(DT))
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
