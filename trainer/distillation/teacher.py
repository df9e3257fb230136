"""The teacher of train.objective=align|distill: read from a Hugging Face Llama-family folder, a hylo export or a
hylo checkpoint (checkpointing/transfer.py's `load_source_model`), checked against the student before any step,
frozen, and laid out as the student is: its dtype (bf16 weights where the student computes in bf16), the same
context parallelism (its attention layers on ring/Ulysses), its blocks sharded with FSDP2 where the student's
parameters are sharded (FSDP2 or ZeRO-3; no gradients, no optimizer state).  Its embedding, final norm and head
stay whole on every rank: the chunked KL reads the head outside the teacher's forward.

Its identity — a fingerprint of its weights as loaded, whatever the format they came in — is recorded in every
checkpoint; a resume with another teacher is refused by name (the same weights moved or re-exported: a note).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hylo.trainer.errors import ConfigError


def fingerprint(model: nn.Module) -> str:
    """sha256 of the teacher as loaded: every tensor's name, dtype, shape and bytes (float32 on the CPU), and its
    layer types — the same weights in any format (checkpoint, export, HF folder) are the same teacher."""
    from hylo.models.lm import layer_types

    digest = hashlib.sha256(" ".join(layer_types(model.cfg)).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy())
    return digest.hexdigest()[:32]


@dataclass
class Teacher:
    model: nn.Module  # a HybridLM, frozen
    path: Path  # its files (a run dir resolved to its step folder)
    identity: dict[str, Any]  # recorded in every checkpoint

    @property
    def cfg(self):
        return self.model.cfg

    def head_weight(self) -> torch.Tensor:
        return self.model.head.weight if self.model.head is not None else self.model.embed.weight

    def forward(self, micro, **kwargs) -> Any:
        """The teacher on a micro-batch's tokens, positions and documents, without gradients; its sharded blocks
        are freed after (what torch < 2.8 does not do for a root module by itself)."""
        with torch.no_grad():
            out = self.model(micro.inputs, micro.positions, cu_seqlens=micro.cu_seqlens, **kwargs)
        for block in self.model.blocks:
            if hasattr(block, "reshard"):  # an FSDP2 module
                block.reshard()
        return out


def load_teacher(path: str) -> Teacher:
    """The teacher on the CPU in float32, frozen, with its identity."""
    from hylo.models.lm import layer_types
    from hylo.trainer.checkpointing.transfer import load_source_model, resolve_source

    files = resolve_source(path, "distill.teacher")
    model, model_cfg = load_source_model(files, "distill.teacher")
    model.requires_grad_(False)
    model.eval()
    identity = {"path": str(files.resolve()), "fingerprint": fingerprint(model),
                "vocab_size": model_cfg.vocab_size, "d_model": model_cfg.d_model,
                "layers": layer_types(model_cfg)}
    return Teacher(model, files, identity)


def align_layers(cfg, teacher: Teacher) -> list[int]:
    """distill.align_layers, or every block whose layer type differs from the teacher's at that depth."""
    from hylo.models.lm import layer_types

    if cfg.distill.align_layers:
        return sorted(set(cfg.distill.align_layers))
    ours, theirs = layer_types(cfg.model), layer_types(teacher.cfg)
    layers = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b]
    if not layers:
        raise ConfigError(f"train.objective=align: every block has the teacher's layer type ({ours}), so no mixer "
                          "is new; list the blocks to align in distill.align_layers, or use train.objective=distill")
    return layers


def check_student(cfg, teacher: Teacher) -> None:
    """Refuse, in one line and before any step, a teacher the objective cannot compare with this student."""
    from hylo.models.lm import layer_types

    m, t = cfg.model, teacher.cfg
    where = f"distill.teacher={cfg.distill.teacher}"
    if m.vocab_size != t.vocab_size:
        raise ConfigError(f"{where} predicts over {t.vocab_size} tokens, this student over {m.vocab_size}: the KL "
                          "compares distributions over one vocabulary. Train on the teacher's tokenizer "
                          f"(data.tokenizer=<its tokenizer.json>) with model.vocab_size={t.vocab_size}")
    if cfg.train.objective == "align" and (m.d_model != t.d_model or m.n_layers != t.n_layers):
        raise ConfigError(f"{where} has {t.n_layers} layers of width {t.d_model}, this student {m.n_layers} of "
                          f"{m.d_model}: align trains each student layer on the teacher's layer at its depth, so "
                          "both need the same depth and width (model.init_from=<the teacher> takes its shape)")
    if cfg.train.objective == "align" and not m.init_from:
        raise ConfigError("train.objective=align trains new mixers inside the teacher's own blocks (its MLPs, "
                          "norms and embedding, frozen): start the student from it with model.init_from="
                          f"{cfg.distill.teacher} (or from a run that started from it)")
    if any(i >= m.n_layers for i in cfg.distill.align_layers):
        raise ConfigError(f"distill.align_layers={cfg.distill.align_layers}: this student's blocks are 0 to "
                          f"{m.n_layers - 1}")
    if cfg.train.objective == "align":
        theirs = layer_types(t)
        off = [i for i in align_layers(cfg, teacher) if theirs[i] not in ("full", "swa")]
        if off:
            raise ConfigError(f"train.objective=align: the teacher's block(s) {off} are {[theirs[i] for i in off]}, "
                              "not softmax attention; align trains new mixers on a teacher's attention layers")


def check_same_teacher(saved: dict[str, Any] | None, teacher: Teacher, checkpoint: Path) -> str | None:
    """On resume: refuse another teacher than the checkpoint's by name; a moved one (same files) gets a note."""
    if not saved:
        return None
    if saved.get("fingerprint") != teacher.identity["fingerprint"]:
        raise ConfigError(f"checkpoint {checkpoint} was distilled from the teacher {saved.get('path')} (fingerprint "
                          f"{saved.get('fingerprint')}); distill.teacher={teacher.path} has other weights (fingerprint "
                          f"{teacher.identity['fingerprint']}). Resume with the checkpoint's teacher, or start a new "
                          f"run from its weights (model.init_from={checkpoint})")
    if saved.get("path") != teacher.identity["path"]:
        return (f"[hylo] the teacher's weights come from another place now: {saved.get('path')} -> "
                f"{teacher.identity['path']} (the same weights, fingerprint {teacher.identity['fingerprint']})")
    return None


def prepare_teacher(teacher: Teacher, device: torch.device, dtype: torch.dtype, cp_context=None,
                    shard: bool = False) -> None:
    """Lay the teacher out as the student is (module docstring); in place."""
    from torch.distributed.fsdp import fully_shard

    from hylo.parallel.strategies import apply_context_parallel

    model = teacher.model
    model.to(device=device)
    for param in model.parameters():  # the weights only: RoPE frequencies and decay rates stay float32
        param.data = param.data.to(dtype)
    if cp_context is not None:
        apply_context_parallel(model, cp_context)
    if shard:  # each block its own root: said explicitly, a root reshards after forward too (no backward follows)
        for block in model.blocks:
            fully_shard(block, reshard_after_forward=True)


def teacher_model_config(path: str):
    """The teacher's model config without reading its weights (for hylo plan)."""
    from hylo.trainer.checkpointing.transfer import resolve_source, source_model_config

    return source_model_config(resolve_source(path, "distill.teacher"))
