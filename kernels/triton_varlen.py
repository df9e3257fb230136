"""Packed documents inside the chunk-parallel Triton kernels (lightning, BASED): which chunk a program works on.

The host side is `kernels.varlen.chunk_table`: every document cut into chunks of its own, so no chunk holds two
documents.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_program(bh, c, T, H, NC, CHUNK_ROWS, VARLEN: tl.constexpr, BT: tl.constexpr):
    """Program (bh, c) of a chunk-parallel kernel -> (batch, head, first row, end row, state slot): chunk c of row
    b, or with VARLEN (batch 1) chunk c of the packed documents' chunk table, whose states sit at h * NC + c."""
    if VARLEN:
        b, h = (bh * 0).to(tl.int64), bh
        row0, end = tl.load(CHUNK_ROWS + 2 * c), tl.load(CHUNK_ROWS + 2 * c + 1)
        slot = h.to(tl.int64) * NC + c
    else:
        b, h = (bh // H).to(tl.int64), bh % H
        row0, end = c * BT, T
        slot = bh.to(tl.int64) * tl.cdiv(T, BT) + c
    return b, h, row0, end, slot


@triton.jit
def state_program(bh, T, H, NC, n_docs, CU, CHUNK0, VARLEN: tl.constexpr, REVERSE: tl.constexpr,
                  BT: tl.constexpr):
    """Program bh of a sequential state pass -> (batch, head, state row, first token, tokens, first state slot,
    whether the initial state enters here, whether the final state is stored from here): row b of the batch, or
    with VARLEN one (document, head), whose chunks' states sit from h * NC + its first chunk; the initial state
    enters the first document walked (the last one in REVERSE) and the final state is the last one's."""
    if VARLEN:
        doc, h = bh // H, bh % H
        b, row = (bh * 0).to(tl.int64), h
        bos, length = tl.load(CU + doc).to(tl.int64), tl.load(CU + doc + 1) - tl.load(CU + doc)
        slot0 = h.to(tl.int64) * NC + tl.load(CHUNK0 + doc)
        if REVERSE:
            enters, leaves = doc == n_docs - 1, doc == 0
        else:
            enters, leaves = doc == 0, doc == n_docs - 1
    else:
        b, h = (bh // H).to(tl.int64), bh % H
        row, bos, length = bh, (bh * 0).to(tl.int64), T
        slot0 = bh.to(tl.int64) * tl.cdiv(T, BT)
        enters, leaves = bh >= 0, bh >= 0
    return b, h, row, bos, length, slot0, enters, leaves
