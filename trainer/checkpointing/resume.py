"""What a resumed run takes from its checkpoint and what from its own config.

The config itself: a resume of an existing run starts from the config the checkpoint was trained with (saved in
its trainer state), then applies this command's overrides — `hylo train --resume run.dir=runs/x train.steps=40`
continues runs/x as it was set up, without retyping its overrides; an explicit `--config` wins, with a note.

From the checkpoint: the weights, the optimizer's moments, the step, the schedule's position and the data position.
From the new config: every optimiser and schedule setting (so `--resume train.lr=1e-3` trains at 1e-3), listed in
a note when it differs from the checkpoint's.  Settings that define the parameters' shapes cannot change on resume
and are refused by name; model settings the weights fit but that change what the model computes (the window,
RoPE's base, RAT's chunk, ...) are allowed with a note of their own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from hylo.trainer.config import Config, load_config
from hylo.trainer.engines.optim import lr_factor
from hylo.trainer.errors import CheckpointError, ConfigError

# Keys whose change alters the parameters' shapes: a checkpoint cannot be loaded into such a model.
SHAPE_KEYS = ("model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads",
              "model.head_dim", "model.ffn_dim", "model.pattern", "model.tie_embeddings", "model.mlp", "model.norm",
              "model.attn.sink", "model.attn.gate", "model.rat.qk_groups", "model.based.feature_dim",
              "model.based.conv_kernel", "model.based.conv_expand", "model.tnl.hidden", "model.tnl.lrpe")
# Keys the weights fit either way but that change what the model computes: allowed (growing a window or RAT's
# chunk along with train.seq_len is a staged-training recipe), and said out loud.
COMPUTE_KEYS = ("model.window", "model.rope_theta", "model.norm_eps", "model.embed_scale",
                "model.document_positions", "model.attn.pinned", "model.rat.chunk_size")
# Model keys that change neither: how the weights start or how much memory a step takes.
NEUTRAL_MODEL_KEYS = ("model.init_std", "model.init_from", "model.mlp_tile", "model.attn.backend",
                      "model.rat.backend", "model.based.backend", "model.tnl.backend")
# Keys a resume takes from the new config (the rest of the new config applies anyway; these are the ones a
# checkpoint also carries, so they are the ones a user could believe were ignored).
OPTIMISER_KEYS = ("train.lr", "train.grad_clip", "optim.weight_decay", "optim.betas", "optim.eps",
                  "schedule.warmup_steps", "schedule.decay", "schedule.min_lr_ratio", "train.steps")


def config_record(cfg: Config) -> dict[str, Any]:
    """The run's config as plain JSON, saved in the trainer state."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def _get(record: dict[str, Any], key: str):
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def resume_changes(saved: dict[str, Any] | None, cfg: Config, checkpoint: str) -> tuple[list[str], list[str]]:
    """Refuse shape changes; return 'key old -> new' for the optimiser/schedule settings that changed, and for the
    model settings that change what the model computes."""
    if saved is None:  # written before checkpoints carried their config
        return [], []
    now = config_record(cfg)

    def changed(keys):
        return [f"{key} {_get(saved, key)!r} -> {_get(now, key)!r}" for key in keys
                if _get(saved, key) != _get(now, key)]

    if shape := changed(SHAPE_KEYS):
        raise ConfigError(f"checkpoint {checkpoint} holds a model of another shape ({'; '.join(shape)}): these "
                          "settings cannot change on resume. Use the checkpoint's values, or start a new run from "
                          "its weights where they fit (hylo export, then model.init_from)")
    return changed(OPTIMISER_KEYS), changed(COMPUTE_KEYS)


def apply_optimiser_settings(optimizer: torch.optim.Optimizer, scheduler, cfg: Config) -> None:
    """Overwrite what loading the optimizer and scheduler restored with this run's settings: lr (at the schedule's
    current position), weight decay of the decayed group, betas and eps."""
    scheduler.base_lrs = [cfg.train.lr] * len(optimizer.param_groups)
    factor = lr_factor(scheduler.last_epoch, cfg)
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = cfg.train.lr
        group["lr"] = cfg.train.lr * factor
        group["betas"] = tuple(cfg.optim.betas)
        group["eps"] = cfg.optim.eps
        if i == 0:  # build_optimizer's first group holds the matrices, the second (no decay) the rest
            group["weight_decay"] = cfg.optim.weight_decay


def run_config(config_path: str | None, overrides: list[str]) -> Config:
    """The config `hylo train` runs with: `config_path` and `overrides` as given, or — when they resume a run whose
    checkpoint records its config, and no --config was given — that config with the overrides on top (run.dir and
    checkpoint.resume always this command's)."""
    cfg = load_config(config_path, overrides)
    if cfg.checkpoint.resume == "none":
        return cfg
    from hylo.trainer.checkpointing import latest_checkpoint, read_trainer_state

    ckpt_dir = Path(cfg.run.dir) / "checkpoints"
    checkpoint = latest_checkpoint(ckpt_dir) if cfg.checkpoint.resume == "auto" else Path(cfg.checkpoint.resume)
    if checkpoint is None:
        return cfg
    try:
        record = read_trainer_state(checkpoint).get("config")
    except CheckpointError:
        return cfg  # the trainer refuses it, or auto falls back, with the full story
    if not isinstance(record, dict):
        return cfg
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    if config_path is not None:
        say(f"[hylo] note: resuming {checkpoint} with --config {config_path} as given, not the config that "
            "checkpoint was trained with", flush=True)
        return cfg
    record = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(record), {
        "run": {"dir": cfg.run.dir}, "checkpoint": {"resume": cfg.checkpoint.resume}}))
    shown = [o for o in overrides if not o.startswith(("checkpoint.resume=", "run.dir="))]
    say(f"[hylo] resuming with the config {checkpoint} was trained with"
        + (f", and this command's overrides: {' '.join(shown)}" if shown else ""), flush=True)
    return load_config(None, overrides, base=record)
