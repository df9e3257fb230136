"""The mixer contract: what every sequence-mixing layer type provides, in one place.

A layer type is one `Mixer` subclass in models/ (registered by name with `@register_mixer`), one op folder in
kernels/, and its row in parallel/strategies.py's table (which context-parallel strategy runs it); nothing else in
the framework names layer types.

  forward(x, positions, cu_seqlens) x: the pre-normed (batch, seq, d_model) input; positions: its tokens' global
                                   positions (under context parallelism a rank holds only some of them);
                                   cu_seqlens: packed documents (batch 1, kernels/varlen.py) or None
  prefill(x, positions)            the parallel forward of a prompt plus the decoding cache stepping would hold
                                   after it (built by the op's kernels/<op>/step.py)
  step(x, pos, cache)              one token at global position `pos`; cache=None starts a sequence
  check_config(config)             a reason this run's config does not suit the layer, or None
  attention_flops_per_token(...)   forward FLOPs a token spends in the sequence mixing itself (beyond the
                                   projections 6N counts): linear layers are not counted as quadratic
  saved_per_token(cfg, act, compute)  what autograd keeps per token for backward (the planner's model)
  monitor_group, monitor(...)      what the layer reports to a monitor callback (trainer/callbacks/monitors.py)

Mixers call their op through `self.op` and never talk to other ranks themselves: context parallelism swaps the op
from outside (parallel/strategies.py finds the strategy by `layer_type`; the new op keeps the signature and the
kernels the mixer's config names, `self.backend`), and monitors hand them a `reduce` (a sum over the CP group) for
statistics that span ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from hylo.kernels.varlen import DocumentView

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Saved:
    """One tensor a layer keeps for backward: bytes per token, and whether selective checkpointing keeps it (the
    outputs of the mixer's op) or recomputes it."""

    what: str
    bytes: float
    op_output: bool = False


def with_backend(op: Callable[..., Any], backend: str) -> Callable[..., Any]:
    """`op` bound to the kernels a layer's config names (model.<type>.backend); "auto" leaves the choice to
    kernels/dispatch.py per call."""
    return op if backend == "auto" else partial(op, backend=backend)


class Mixer(nn.Module):
    layer_type: ClassVar[str]  # set by @register_mixer
    monitor_group: ClassVar[str | None] = None  # "sinks" | "states": which monitor callback asks this layer

    op: Callable[..., Any]

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def step(self, x: torch.Tensor, pos: int, cache: Any) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    @classmethod
    def check_config(cls, config) -> str | None:
        return None

    @classmethod
    def attention_flops_per_token(cls, model_cfg, seq_len: int) -> float:
        raise NotImplementedError

    @classmethod
    def saved_per_token(cls, model_cfg, act: int, compute: int) -> list[Saved]:
        """What the mixer (from its pre-normed input to its output projection's input) keeps for backward with the
        fused kernels a GPU runs, per token: `act` bytes per activation element (2 under bf16 autocast), `compute`
        bytes per element of what stays in fp32 (gates, lse, norms)."""
        raise NotImplementedError

    def init_special(self) -> None:
        """Initialisation beyond the LM's generic one (gate biases, decay rates); called after it."""

    @torch.no_grad()
    def monitor(self, x: torch.Tensor, positions: torch.Tensor, reduce: Reduce,
                documents: DocumentView | None = None,
                **settings) -> dict[str, torch.Tensor]:
        """Scalars for TensorBoard (full tags) from this forward's input; `reduce` sums a tensor over the CP group
        so that every rank returns the whole sequence's values; `documents`: the packed documents of this forward
        (data.document_masking), which the statistics respect as the forward did."""
        return {}


def state_norm_scalars(layer: int, norms: torch.Tensor) -> dict[str, torch.Tensor]:
    """states/layer{i}/norm (mean over heads) and .../max_head from a linear layer's per-head final-state norms."""
    return {f"states/layer{layer}/norm": norms.mean(), f"states/layer{layer}/max_head": norms.max()}
