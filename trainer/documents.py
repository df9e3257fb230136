"""Document masking (`data.document_masking`): the rows of a micro-batch become one packed sequence whose document
boundaries are the EOS tokens the packer already writes after every document, so no layer lets a token see
another document.  Token shards and every text format get it without a format change.

A document ends with its EOS token (the token after an EOS starts the next one), and a row boundary is always a
document boundary.  Positions either stay those of each row (the default) or restart at every document start
(`model.document_positions=true`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.varlen import positions_within_documents


@dataclass
class Packed:
    inputs: torch.Tensor  # (1, B * T)
    targets: torch.Tensor  # (1, B * T)
    positions: torch.Tensor  # (B * T,) on the inputs' device
    cu_seqlens: torch.Tensor  # (documents + 1,) int32 on the CPU: the ops read it without a device sync


@dataclass(frozen=True)
class DocumentMasking:
    """What the engines and evaluation need to pack a micro-batch: the EOS id and the position rule."""

    eos_id: int
    restart_positions: bool

    def pack(self, inputs: torch.Tensor, targets: torch.Tensor) -> Packed:
        return pack_documents(inputs, targets, self.eos_id, self.restart_positions)


def document_masking(cfg, tokenizer) -> DocumentMasking | None:
    """The run's masking (data.document_masking, model.document_positions), or None when it is off."""
    if not cfg.data.document_masking:
        return None
    from trainer.tokenizer import EOS

    return DocumentMasking(tokenizer.token_to_id(EOS), cfg.model.document_positions)


def pack_documents(inputs: torch.Tensor, targets: torch.Tensor, eos_id: int, restart_positions: bool) -> Packed:
    """inputs, targets (B, T) -> one packed sequence with its document boundaries."""
    b, t = inputs.shape
    flat = inputs.reshape(-1)
    ends = (flat == eos_id).nonzero()[:, 0].cpu() + 1  # the token after an EOS starts a document
    cuts = torch.cat([torch.arange(0, b * t + 1, t), ends])
    cu_seqlens = torch.unique(cuts).to(torch.int32)  # sorted; an EOS at a row's end gives a cut already there
    if restart_positions:
        positions = positions_within_documents(cu_seqlens, b * t)
    else:
        positions = torch.arange(t).repeat(b)
    return Packed(inputs.reshape(1, -1), targets.reshape(1, -1), positions.to(inputs.device), cu_seqlens)
