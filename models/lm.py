"""HybridLM: token embedding -> pre-norm blocks (mixer + MLP) -> norm -> tied or untied head.

Block i's mixer is `model.pattern[i % len(pattern)]`, looked up in the layer-type registry (a pattern as long as
`n_layers` spells out every layer); importing this module registers every layer type.  Every mixer also decodes
token by token (`step`), which `generate` uses.  Nothing in models/ knows about parallelism: parallel/strategies.py
wraps a built model from outside, finding each layer type's context-parallel strategy by its name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hylo.models import attention, based, rat, tnl  # noqa: F401  (each registers its layer types in MIXERS)
from hylo.models.layers import MLPS, RMSNorm, ffn_width, tiled_mlp
from hylo.models.loss import chunked_cross_entropy, full_cross_entropy, token_nll
from hylo.models.registry import MIXERS

__all__ = ["MIXERS", "HybridLM", "layer_types"]  # the model's public names: `from hylo.models.lm import HybridLM`


def layer_types(cfg) -> list[str]:
    """The layer type of each of the `cfg.n_layers` blocks: the pattern repeated (and cut) to length."""
    return [cfg.pattern[i % len(cfg.pattern)] for i in range(cfg.n_layers)]


class Block(nn.Module):
    def __init__(self, cfg, layer_idx: int, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        with_weight = cfg.norm == "rms"
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps, with_weight)
        self.mixer = MIXERS[layer_type](cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, with_weight)
        self.mlp = MLPS[cfg.mlp](cfg.d_model, ffn_width(cfg))
        self.mlp_tile = cfg.mlp_tile

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                mixer_only: bool = False) -> torch.Tensor:
        """The block's output; `mixer_only`: its mixer's output alone (a layer trained to match a teacher's)."""
        y = self.mixer(self.mixer_norm(x), positions, cu_seqlens=cu_seqlens)  # hooks see (x, positions)
        if mixer_only:
            return y
        x = x + y
        return x + tiled_mlp(self.mlp, self.mlp_norm(x), self.mlp_tile)

    def prefill(self, x: torch.Tensor, positions: torch.Tensor):
        y, cache = self.mixer.prefill(self.mixer_norm(x), positions)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache

    def step(self, x: torch.Tensor, pos: int, cache):
        y, cache = self.mixer.step(self.mixer_norm(x), pos, cache)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache


class HybridLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (the trainer fills it from the tokenizer)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i, kind) for i, kind in enumerate(layer_types(cfg)))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm == "rms")
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, init_std), residual output projections scaled by 1/sqrt(2 * n_layers); then each
        mixer's own special initialisation (gate biases, decay rates)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if getattr(module, "is_residual_projection", False) else 1
                nn.init.normal_(module.weight, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
        for block in self.blocks:
            block.mixer.init_special()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.head(x) if self.head is not None else F.linear(x, self.embed.weight)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, loss_chunk: int = 0, reduction: str = "mean",
                logits_at: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                head_loss: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
                mixer_inputs: dict[int, torch.Tensor] | None = None) -> Any:
        """tokens (batch, seq) -> logits (batch, seq, vocab).  `positions` (seq,) are global positions.

        With `targets` (batch, seq; -100 = not scored) it returns the loss instead, computed here so that sharded
        (FSDP2, ZeRO-3) head weights are gathered: the mean cross-entropy (`reduction="mean"`) or each token's
        (`"none"`, for evaluation), through the head `loss_chunk` tokens at a time (models/loss.py) when the
        tokens outnumber it, so the full logits never exist.  With `logits_at` (batch, seq; bool) it returns the
        logits of those tokens only, (n, vocab) in row-major order (recall evaluations score a few positions).
        `cu_seqlens`: tokens (1, T) hold packed documents with these boundaries (kernels/varlen.py), and no layer
        lets a token see another document; `positions` (T,) may then restart at each document.

        Distillation (trainer/distillation/) asks for two more things, here for the same reason as the loss:
        `head_loss(hidden, weight)` is called with the final normed hidden states and the head weight and its
        result returned (a loss against a teacher's logits); `mixer_inputs` {block index: residual stream entering
        it} runs only those blocks' mixers, each on its given input (teacher forcing), and returns {index: mixer
        output}."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        if mixer_inputs is not None:
            return {i: self.blocks[i](x, positions, cu_seqlens, mixer_only=True) for i, x in mixer_inputs.items()}
        x = self.embed(tokens) * self.embed_scale
        for block in self.blocks:
            x = block(x, positions, cu_seqlens)
        if head_loss is not None:
            return head_loss(self.norm(x), self.head.weight if self.head is not None else self.embed.weight)
        if logits_at is not None:
            return self._logits(x[logits_at])
        if targets is None:
            return self._logits(x)
        hidden = self.norm(x)
        weight = self.head.weight if self.head is not None else self.embed.weight
        chunked = 0 < loss_chunk < targets.numel()
        if reduction == "none":
            return token_nll(hidden, weight, targets, loss_chunk if chunked else 0)
        if chunked:
            return chunked_cross_entropy(hidden, weight, targets, loss_chunk)
        return full_cross_entropy(hidden, weight, targets)

    def step(self, tokens: torch.Tensor, pos: int, caches: list | None) -> tuple[torch.Tensor, list]:
        """One decoding step: tokens (batch,) at position `pos` -> (logits (batch, vocab), caches)."""
        caches = caches or [None] * len(self.blocks)
        x = self.embed(tokens[:, None]) * self.embed_scale
        new = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block.step(x, pos, cache)
            new.append(cache)
        return self._logits(x)[:, 0], new

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list]:
        """A prompt in one parallel forward: tokens (batch, T) -> (logits of the last token (batch, vocab), the
        caches `step` continues from at position T) — the same caches as stepping through the prompt."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) * self.embed_scale
        caches = []
        for block in self.blocks:
            x, cache = block.prefill(x, positions)
            caches.append(cache)
        return self._logits(x[:, -1:])[:, 0], caches

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int,
                 pick: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Decoding: the prompt in one parallel pass (`prefill`), then token by token through each layer's
        recurrent cache.  prompt (batch, T0) -> (batch, T0 + max_new_tokens).  `pick` turns the last logits
        (batch, vocab) into the next tokens (batch, 1) — greedy when None (the samplers:
        trainer/evaluation/generate.py);
        `on_token` sees each new (batch, 1) as it is chosen (streaming)."""
        tokens = prompt
        logits, caches = self.prefill(prompt)
        for pos in range(prompt.shape[1], prompt.shape[1] + max_new_tokens):
            new = logits.argmax(-1, keepdim=True) if pick is None else pick(logits)
            tokens = torch.cat([tokens, new], dim=1)
            if on_token is not None:
                on_token(new)
            if pos < prompt.shape[1] + max_new_tokens - 1:
                logits, caches = self.step(tokens[:, pos], pos, caches)
        return tokens

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward = 3x forward) per token at context `seq_len`.

        6 per weight used in a matmul (the head included, the embedding lookup not), plus each layer's own
        sequence-mixing term from its layer type: causal softmax counts the keys actually attended, sliding
        windows count at most W, linear layers count a constant.
        """
        matmul_params = sum(p.numel() for name, p in self.named_parameters() if p.dim() >= 2 and "embed" not in name)
        if self.head is None:
            matmul_params += self.embed.weight.numel()
        mixing = sum(MIXERS[b.layer_type].attention_flops_per_token(self.cfg, seq_len) for b in self.blocks)
        return 6 * matmul_params + 3 * mixing
