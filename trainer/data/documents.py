"""Document masking (`data.document_masking`): the rows of a micro-batch become one packed sequence whose document
boundaries are the EOS tokens the packer already writes after every document, so no layer lets a token see
another document.  Token shards and every text format get it without a format change.

A document ends with its EOS token (the token after an EOS starts the next one), and a row boundary is always a
document boundary.  Positions either stay those of each row (the default) or restart at every document start
(`model.document_positions=true`).

Under context parallelism every CP rank holds the whole rows, finds the boundaries of the whole packed sequence
from them (the same on every rank, no communication), and keeps its own tokens of each row: the CP ops take the
global boundaries and the layout of the rows (parallel/layout.py, `sequence_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hylo.kernels.varlen import positions_within_documents


@dataclass
class Packed:
    inputs: torch.Tensor  # (1, B * T), or (1, B * T_local): this CP rank's tokens of each row
    targets: torch.Tensor  # like inputs
    positions: torch.Tensor  # (B * T,) or (B * T_local,) on the inputs' device
    cu_seqlens: torch.Tensor  # (documents + 1,) int32 on the CPU: the ops read it without a device sync; always the
    #                          whole packed sequence's boundaries (B * T tokens), also under context parallelism


@dataclass(frozen=True)
class DocumentMasking:
    """What the engines and evaluation need to pack a micro-batch: the EOS id and the position rule."""

    eos_id: int
    restart_positions: bool

    def pack(self, inputs: torch.Tensor, targets: torch.Tensor, local: torch.Tensor | None = None) -> Packed:
        return pack_documents(inputs, targets, self.eos_id, self.restart_positions, local)


def document_masking(cfg, tokenizer) -> DocumentMasking | None:
    """The run's masking (data.document_masking, model.document_positions), or None when it is off."""
    if not cfg.data.document_masking:
        return None
    from hylo.trainer.data.tokenizer import eos_id

    return DocumentMasking(eos_id(tokenizer), cfg.model.document_positions)


def pack_documents(inputs: torch.Tensor, targets: torch.Tensor, eos_id: int, restart_positions: bool,
                   local: torch.Tensor | None = None) -> Packed:
    """inputs, targets (B, T) -> one packed sequence with its document boundaries.  `local`: the positions of a
    row this context-parallel rank holds; the rank keeps those tokens of every row (boundaries stay global)."""
    b, t = inputs.shape
    flat = inputs.reshape(-1)
    ends = (flat == eos_id).nonzero()[:, 0].cpu() + 1  # the token after an EOS starts a document
    cuts = torch.cat([torch.arange(0, b * t + 1, t), ends])
    cu_seqlens = torch.unique(cuts).to(torch.int32)  # sorted; an EOS at a row's end gives a cut already there
    if restart_positions:
        positions = positions_within_documents(cu_seqlens, b * t).view(b, t)
    else:
        positions = torch.arange(t).repeat(b, 1)
    if local is not None:
        inputs, targets, positions = inputs[:, local], targets[:, local], positions[:, local.cpu()]
    return Packed(inputs.reshape(1, -1), targets.reshape(1, -1), positions.reshape(-1).to(inputs.device), cu_seqlens)
