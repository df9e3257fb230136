"""Sink-aware softmax attention mixers: full causal (`full`) and sliding window (`swa`).

Each head has a learned sink logit b_h (on by default, initialised to 0) that joins every softmax denominator
and carries no value (gpt-oss style), so a head can put mass "nowhere" instead of on the first token.  Options:
a head-wise sigmoid output gate, and for window layers StreamingLLM-style pinned first tokens.

Window convention: with `model.window = W` a query at position i sees keys i-W+1 .. i (itself and the W-1
tokens before it).

Monitoring (group "sinks"): per head the mass on the learned sink, the mass on the first token, and the positions
receiving the most attention from a sample of the last queries, flagged as *secondary sinks* above a threshold
(Gu et al.'s 0.3 by default) — exact under context parallelism too (partial sums reduced over the CP group).
"""

from __future__ import annotations

import torch
from torch import nn

from hylo.kernels.ops import attention, attention_prefill, attention_step
from hylo.kernels.varlen import DocumentView
from hylo.models.mixer import Mixer, Reduce, Saved, with_backend
from hylo.models.registry import register_mixer
from hylo.models.rope import RotaryEmbedding, apply_rope


class SoftmaxAttention(Mixer):
    window: int | None = None
    monitor_group = "sinks"

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.out.is_residual_projection = True
        self.sink = nn.Parameter(torch.zeros(self.n_heads)) if cfg.attn.sink else None
        self.gate = nn.Linear(cfg.d_model, self.n_heads, bias=True) if cfg.attn.gate else None
        self.n_pinned = cfg.attn.pinned if self.window is not None else 0
        self.rope = RotaryEmbedding(self.head_dim, cfg.rope_theta)
        self.backend = cfg.attn.backend
        self.op = with_backend(attention, self.backend)  # context parallelism swaps in ring / Ulysses / halo ops

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        cos, sin = self.rope(positions)
        q = apply_rope(q.view(b, t, self.n_heads, hd), cos, sin)
        k = apply_rope(k.view(b, t, self.n_kv_heads, hd), cos, sin)
        return q, k, v.view(b, t, self.n_kv_heads, hd)

    def _output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            o = o * torch.sigmoid(self.gate(x)).unsqueeze(-1).to(o.dtype)
        return self.out(o.flatten(2))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x, positions)
        return self._output(x, self.op(q, k, v, window=self.window, sink=self.sink, n_pinned=self.n_pinned,
                                       cu_seqlens=cu_seqlens))

    def prefill(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The parallel forward of a prompt plus the cache `step` would hold after it."""
        q, k, v = self._qkv(x, positions)
        o = attention(q, k, v, window=self.window, sink=self.sink, n_pinned=self.n_pinned, backend=self.backend)
        return self._output(x, o), attention_prefill(k, v, window=self.window, n_pinned=self.n_pinned)

    def step(self, x: torch.Tensor, pos: int, cache: dict | None) -> tuple[torch.Tensor, dict]:
        """x (B, 1, D) at global position `pos` -> (y (B, 1, D), cache)."""
        q, k, v = self._qkv(x, torch.tensor([pos], device=x.device))
        o, cache = attention_step(cache, q[:, 0], k[:, 0], v[:, 0], window=self.window, sink=self.sink,
                                  n_pinned=self.n_pinned)
        return self._output(x, o[:, None]), cache

    @torch.no_grad()
    def monitor(self, x: torch.Tensor, positions: torch.Tensor, reduce: Reduce,
                documents: DocumentView | None = None,
                n_queries: int = 64, threshold: float = 0.3) -> dict[str, torch.Tensor]:
        q, k, v = self._qkv(x, positions)
        cu_seqlens = None if documents is None else documents.cu_seqlens
        op = attention if self.backend == "sdpa" else self.op  # (SDPA gives no lse; the statistics need it)
        _, lse = op(q, k, v, window=self.window, sink=self.sink, n_pinned=self.n_pinned, return_lse=True,
                    cu_seqlens=cu_seqlens)
        stats = sink_statistics(q, k, lse, self.sink, window=self.window, n_pinned=self.n_pinned,
                                n_queries=n_queries, threshold=threshold, positions=positions, reduce=reduce,
                                documents=documents)
        return sink_scalars(self.layer_idx, stats)

    @classmethod
    def check_config(cls, config) -> str | None:
        """A reason this run's config does not suit the layer, or None."""
        if config.model.attn.pinned < 0:
            return f"model.attn.pinned={config.model.attn.pinned} must be >= 0"
        attn = config.model.attn
        if attn.backend == "sdpa" and (attn.sink or (attn.pinned and cls.layer_type == "swa")):
            return ("model.attn.backend=sdpa runs plain attention only (no sink logits, no pinned tokens): set "
                    "model.attn.sink=false and model.attn.pinned=0, or use auto/flash, which take them")
        if config.parallel.cp > 1 and config.model.attn.backend in ("sdpa", "naive"):
            return (f"model.attn.backend={config.model.attn.backend} cannot run context-parallel attention (each "
                    "piece must return its log-sum-exp): use auto, flash, triton or chunk")
        return None

    @classmethod
    def saved_per_token(cls, model_cfg, act: int, compute: int) -> list[Saved]:
        h, kv = model_cfg.n_heads, model_cfg.n_kv_heads or model_cfg.n_heads
        hd = model_cfg.head_dim or model_cfg.d_model // h
        saved = [Saved("qkv projection (v is a view of it)", (h + 2 * kv) * hd * act),
                 Saved("q, k after rotary", (h + kv) * hd * act),
                 Saved("rotary cos, sin", hd * 4),
                 Saved("attention output", h * hd * act, op_output=True),
                 Saved("lse", h * 4, op_output=True)]
        if model_cfg.attn.gate:
            saved += [Saved("output gate", h * compute), Saved("gated output", h * hd * act)]
        return saved

    @classmethod
    def context_per_token(cls, model_cfg, seq_len: int) -> float:
        """Mean number of keys a query attends to over a causal sequence of `seq_len` tokens."""
        return (seq_len + 1) / 2

    @classmethod
    def attention_flops_per_token(cls, model_cfg, seq_len: int) -> float:
        head_dim = model_cfg.head_dim or model_cfg.d_model // model_cfg.n_heads
        # QK^T and PV: 2 FLOPs per multiply-add, each over head_dim for every attended key and head.
        return 4 * model_cfg.n_heads * head_dim * cls.context_per_token(model_cfg, seq_len)


@register_mixer("full")
class FullAttention(SoftmaxAttention):
    window = None



@register_mixer("swa")
class SlidingWindowAttention(SoftmaxAttention):
    def __init__(self, cfg, layer_idx: int):
        self.window = cfg.window
        super().__init__(cfg, layer_idx)

    @classmethod
    def check_config(cls, config) -> str | None:
        if config.model.window <= 0:
            return f"model.window={config.model.window} must be positive for 'swa' layers"
        return super().check_config(config)

    @classmethod
    def context_per_token(cls, model_cfg, seq_len: int) -> float:
        w = min(model_cfg.window, seq_len)
        # positions 0..w-1 see i+1 keys, the rest see w keys (pinned tokens add at most attn.pinned more)
        return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


# ------------------------------------------------------------------------------------------------ sink monitor
def _same(x: torch.Tensor) -> torch.Tensor:
    return x


@torch.no_grad()
def sink_statistics(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor | None, *,
                    window: int | None, n_pinned: int = 0, n_queries: int = 64, threshold: float = 0.3,
                    top: int = 3, positions: torch.Tensor | None = None,
                    reduce: Reduce = _same, documents: DocumentView | None = None) -> dict[str, torch.Tensor]:
    """Per-head attention-sink statistics from one forward's q (B,T,H,d), k (B,T,Hkv,d) and lse (B,H,T).

    sink_mass         mean over all queries of exp(b_h - lse): the mass on the learned sink (exact)
    first_token_mass  mean over the queries that can see token 0 of exp(s_t0 - lse)
    secondary_pos/_mass  the `top` positions other than 0 with the highest mean received attention alpha_j over
                      the last `n_queries` queries of the first sequence (only positions seen by at least a
                      quarter of them), and their alpha_j
    secondary_count   how many positions other than 0 have alpha_j > threshold: secondary sinks

    Under context parallelism q, k, lse are this rank's tokens at global `positions` (lse the global one, as the
    CP ops return it) and `reduce` sums over the CP group: the queries, keys and sums a statistic needs from other
    ranks arrive through it, so every rank returns the whole sequence's numbers.  With packed `documents` (batch
    1) every document is a sequence of its own: token 0 is each query's document's first token, positions count
    from it, and the secondary sinks are those of the longest document.
    """
    b, t_local, h, d = q.shape
    device = q.device
    if documents is None:  # one document per row
        pos = torch.arange(t_local, device=device) if positions is None else positions.to(device)
        doc = torch.zeros_like(pos)
        n_docs, chosen, t = 1, 0, int(reduce(torch.tensor(t_local, device=device)))
    else:
        pos, doc = documents.within.to(device), documents.index.to(device)
        n_docs, chosen, t = documents.count, documents.longest, documents.longest_length
    total = int(reduce(torch.tensor(t_local, device=device)))
    group = h // k.shape[2]
    kh = k.float().repeat_interleave(group, dim=2)
    qf, lse = q.float(), lse.float()
    scale = d**-0.5
    if sink is not None:
        sink_mass = reduce(torch.exp(sink.float()[None, :, None] - lse).sum(dim=(0, 2))) / (b * total)
    else:
        sink_mass = torch.zeros(h, device=device)

    # each document's first key, from the rank that holds it: (B, documents, H, d)
    firsts = pos == 0
    k0 = reduce(kh.new_zeros(b, n_docs, h, d).index_add_(1, doc[firsts], kh[:, firsts]))
    sees_first = (pos < window) | (n_pinned > 0) if window is not None else torch.ones_like(pos, dtype=torch.bool)
    first_mass = torch.exp(torch.einsum("bthd,bthd->bht", qf, k0[:, doc]) * scale - lse)[:, :, sees_first]
    first_count = reduce(torch.tensor(float(b * int(sees_first.sum())), device=device))
    first_token_mass = reduce(first_mass.sum(dim=(0, 2))) / first_count.clamp(min=1)

    # secondary sinks: the last n queries of the chosen document (row 0), against its keys
    n = min(n_queries, t)
    rows = torch.arange(t - n, t, device=device)
    in_doc = doc == chosen
    mine = in_doc & (pos >= t - n)
    q_rows = torch.zeros(n, h, d, device=device)
    q_rows[pos[mine] - (t - n)] = qf[0, mine]
    lse_rows = torch.zeros(h, n, device=device)
    lse_rows[:, pos[mine] - (t - n)] = lse[0][:, mine]
    q_rows, lse_rows = reduce(q_rows), reduce(lse_rows)

    def visible(keys: torch.Tensor) -> torch.Tensor:
        seen = rows[:, None] >= keys[None, :]
        if window is not None:
            seen &= (rows[:, None] - keys[None, :] < window) | (keys[None, :] < n_pinned)
        return seen

    key_pos = pos[in_doc]
    scores = torch.einsum("qhd,khd->hqk", q_rows, kh[0, in_doc]) * scale  # against this rank's keys of it
    probs = torch.exp(scores - lse_rows[:, :, None]).masked_fill(~visible(key_pos), 0)  # (H, n, keys)
    received = torch.zeros(h, t, device=device)
    received[:, key_pos] = probs.sum(1)
    received = reduce(received)
    every = torch.arange(t, device=device)
    seen_by = visible(every).sum(0)
    alpha = received / seen_by.clamp(min=1)
    eligible = (seen_by >= max(1, n // 4)) & (every > 0)
    alpha = alpha.masked_fill(~eligible, 0)
    mass, where = alpha.topk(min(top, t), dim=-1)
    return {"sink_mass": sink_mass, "first_token_mass": first_token_mass, "secondary_pos": where,
            "secondary_mass": mass, "secondary_count": (alpha > threshold).sum(-1)}


def sink_scalars(layer: int, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TensorBoard tags of one layer's sink statistics: sinks/layer{i}/{what}/head{h} and secondary_sinks."""
    prefix = f"sinks/layer{layer}"
    scalars = {}
    for h in range(len(s["sink_mass"])):
        scalars[f"{prefix}/sink_mass/head{h}"] = s["sink_mass"][h]
        scalars[f"{prefix}/first_token_mass/head{h}"] = s["first_token_mass"][h]
        scalars[f"{prefix}/secondary_top_mass/head{h}"] = s["secondary_mass"][h, 0]
        scalars[f"{prefix}/secondary_top_position/head{h}"] = s["secondary_pos"][h, 0]
    scalars[f"{prefix}/secondary_sinks"] = s["secondary_count"].sum()
    return scalars
