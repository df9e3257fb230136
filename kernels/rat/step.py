"""Recurrent decoding for RAT: one key/value per finished chunk plus the running scanned key/value, O(T/L).

With RoPE the cached summary keys are stored already rotated by their chunk index (rotated once, when the chunk
finishes); the query turns by its own chunk; its own running key shares that angle, which cancels."""

from __future__ import annotations

import torch

from hylo.kernels.rat.chunk import rotate_by_chunk, scan_summaries


def rat_step(state: dict | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor,
             chunk_size: int, scale: float | None = None, rope_theta: float | None = None) -> tuple[torch.Tensor, dict]:
    """One token: q, k, v, gate (B, H, d) -> (o (B, H, d), state).  `state=None` starts a sequence."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if state is None:
        state = {"pos": 0, "k_sum": k.new_zeros(k.shape[0], 0, *k.shape[1:]),
                 "v_sum": v.new_zeros(v.shape[0], 0, *v.shape[1:]), "k_run": None, "v_run": None}
    pos = state["pos"]
    chunk = pos // chunk_size
    if pos % chunk_size == 0:
        k_run, v_run = (1 - gate) * k, (1 - gate) * v
    else:
        k_run = gate * state["k_run"] + (1 - gate) * k
        v_run = gate * state["v_run"] + (1 - gate) * v
    q_rot = rotate_by_chunk(q[:, None], chunk, rope_theta)[:, 0]
    logits = torch.cat([torch.einsum("bhd,bjhd->bhj", q_rot, state["k_sum"]),
                        (q * k_run).sum(-1)[..., None]], dim=-1)
    probs = (logits * scale).softmax(-1)
    values = torch.cat([state["v_sum"], v_run[:, None]], dim=1)
    out = torch.einsum("bhj,bjhd->bhd", probs, values)
    state = {"pos": pos + 1, "k_sum": state["k_sum"], "v_sum": state["v_sum"], "k_run": k_run, "v_run": v_run}
    if pos % chunk_size == chunk_size - 1:  # chunk finished: its running key/value becomes its summary
        k_new = rotate_by_chunk(k_run[:, None], chunk, rope_theta)
        state["k_sum"] = torch.cat([state["k_sum"], k_new], dim=1)
        state["v_sum"] = values
    return out, state


def rat_prefill(k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, chunk_size: int,
                rope_theta: float | None = None) -> dict:
    """The state `rat_step` holds after stepping through a prompt with keys, values and gates (B, T, H, d): the
    summaries of its finished chunks (keys rotated) and the running scanned key/value of the unfinished last one."""
    t, whole = k.shape[1], k.shape[1] // chunk_size * chunk_size
    if whole:
        k_sum, v_sum = scan_summaries(k[:, :whole], v[:, :whole], gate[:, :whole], chunk_size)
    else:
        k_sum, v_sum = k[:, :0], v[:, :0]
    k_run, v_run = (k_sum[:, -1], v_sum[:, -1]) if whole == t else (None, None)
    for i in range(whole, t):  # the unfinished last chunk: at most chunk_size - 1 tokens
        k_run = (1 - gate[:, i]) * k[:, i] + (gate[:, i] * k_run if i > whole else 0)
        v_run = (1 - gate[:, i]) * v[:, i] + (gate[:, i] * v_run if i > whole else 0)
    return {"pos": t, "k_sum": rotate_by_chunk(k_sum, 0, rope_theta), "v_sum": v_sum, "k_run": k_run, "v_run": v_run}
