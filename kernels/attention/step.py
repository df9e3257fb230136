"""Recurrent decoding for softmax attention: a k/v cache (the last `window` tokens plus pinned first tokens)."""

from __future__ import annotations

import torch

from hylo.kernels.attention.naive import naive_attention


def attention_step(state: dict | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   window: int | None = None, sink: torch.Tensor | None = None, scale: float | None = None,
                   n_pinned: int = 0) -> tuple[torch.Tensor, dict]:
    """One token: q (B, H, d), k/v (B, Hkv, d) -> (out (B, H, d), new state).  `state=None` starts a sequence.

    The state holds the keys/values the next query may see: all of them for full attention; for a window W, the
    first `n_pinned` tokens and the W most recent, so its size is bounded by W + n_pinned.
    """
    if state is None:
        empty = k.new_zeros(k.shape[0], 0, *k.shape[1:])
        state = {"pos": 0, "pinned_k": empty, "pinned_v": empty[..., :0].new_zeros(*empty.shape[:3], v.shape[-1]),
                 "k": empty, "v": empty[..., :0].new_zeros(*empty.shape[:3], v.shape[-1])}
    pos = state["pos"]
    state = dict(state, pos=pos + 1)
    which = "pinned_" if window is not None and pos < n_pinned else ""
    state[which + "k"] = torch.cat([state[which + "k"], k[:, None]], dim=1)
    state[which + "v"] = torch.cat([state[which + "v"], v[:, None]], dim=1)
    if window is not None:
        state["k"], state["v"] = state["k"][:, -window:], state["v"][:, -window:]
    keys = torch.cat([state["pinned_k"], state["k"]], dim=1)
    values = torch.cat([state["pinned_v"], state["v"]], dim=1)
    out, _ = naive_attention(q[:, None], keys, values, causal=False, sink=sink, scale=scale)
    return out[:, 0], state


def attention_prefill(k: torch.Tensor, v: torch.Tensor, *, window: int | None = None, n_pinned: int = 0) -> dict:
    """The state `attention_step` holds after stepping through a prompt whose keys/values are k, v (B, T, Hkv, d):
    the pinned first tokens and, for a window, only the last `window` of the rest."""
    t = k.shape[1]
    n_pin = min(n_pinned, t) if window is not None else 0
    rest = slice(n_pin, None) if window is None else slice(max(n_pin, t - window), None)
    return {"pos": t, "pinned_k": k[:, :n_pin], "pinned_v": v[:, :n_pin], "k": k[:, rest], "v": v[:, rest]}
