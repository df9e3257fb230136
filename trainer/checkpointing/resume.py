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
# Keys of what trains: the objective and, aligning, which blocks' mixers (the optimizer state holds theirs alone).
OBJECTIVE_KEYS = ("train.objective", "distill.align_layers")
# The teacher is compared by its identity (trainer/distillation/teacher.py: a fingerprint of its weights), not its path.
TEACHER_KEYS = ("distill.teacher",)
# How the distillation loss weighs its terms: applied from the first resumed step, said.
LOSS_KEYS = ("distill.temperature", "distill.lm_weight")
# Keys newer than some checkpoints: absent from a saved config, they had their default.
ADDED_KEYS = (*OBJECTIVE_KEYS, *LOSS_KEYS)
# Keys that decide which documents the saved data position points at: the position is an index into the order
# train.seed shuffles, over the documents the format, text field and split read.  Changed, the first resumed step
# would read other documents; refused by name unless data.allow_source_change=true (then said).
DATA_ORDER_KEYS = ("train.seed", "data.format", "data.text_field", "data.hf_split", "data.split")
# Keys whose data the checkpoint's provenance record compares (trainer/data/provenance.py: files, dataset, token
# shards, tokenizer, held-out fraction), or the mixture re-weights from the next epoch with a note (data.sources).
DATA_SOURCE_KEYS = ("data.path", "data.tokenizer", "data.val_fraction", "data.sources")
# Keys that change what each sequence trains on but not which tokens come next: allowed, said.
DATA_NOTED_KEYS = ("data.document_masking", "data.mqar.pairs", "data.mqar.n_keys", "data.mqar.n_values")
# Keys of the batch layout: the loader continues from the same token whatever the length (token shards re-cut the
# rest of their epoch, said) or the micro-batch; the global batch it counts in must stay (the loader refuses).
LAYOUT_KEYS = ("train.seq_len", "train.micro_batch_size")
LOADER_KEYS = ("train.batch_size",)
# Keys of how the run executes, logs, saves and evaluates: free to change on resume.
RUNTIME_KEYS = ("run.dir", "data.prefetch", "data.verify", "data.allow_source_change", "train.dtype",
                "train.compile", "train.loss_chunk", "train.activation_checkpointing", "train.activation_offload",
                "train.deterministic", "train.attention_dq", "train.device", "train.cpu_threads", "train.check_memory",
                "train.nan_policy", "train.engine", "optim.fused", "parallel.dp_shard", "parallel.backend",
                "parallel.cp", "parallel.cp_mode", "parallel.ulysses", "deepspeed.zero_stage", "deepspeed.config",
                "checkpoint.interval", "checkpoint.resume", "checkpoint.keep_last", "checkpoint.async_save",
                "checkpoint.checksums", "checkpoint.overwrite", "logging", "eval", "profile")
# Every config key picks one rule (tests/test_lineage.py checks that a new key does): a key or its section.
RESUME_RULES = {**dict.fromkeys(SHAPE_KEYS, "refused: the weights have other shapes"),
                **dict.fromkeys(COMPUTE_KEYS, "allowed, said: what the weights compute changes"),
                **dict.fromkeys(NEUTRAL_MODEL_KEYS, "free: how weights start, or kernels and memory"),
                **dict.fromkeys(OPTIMISER_KEYS, "applied from the first resumed step, said"),
                **dict.fromkeys(OBJECTIVE_KEYS, "refused: another objective trains other parameters"),
                **dict.fromkeys(TEACHER_KEYS, "compared by the teacher's identity (its weights' fingerprint)"),
                **dict.fromkeys(LOSS_KEYS, "applied from the first resumed step, said"),
                **dict.fromkeys(DATA_ORDER_KEYS, "refused unless data.allow_source_change=true, then said"),
                **dict.fromkeys(DATA_SOURCE_KEYS, "compared by the data's provenance; mixtures re-weight"),
                **dict.fromkeys(DATA_NOTED_KEYS, "allowed, said: what a sequence trains on changes"),
                **dict.fromkeys(LAYOUT_KEYS, "free: the loader continues from the same token"),
                **dict.fromkeys(LOADER_KEYS, "refused by the data loader, whose position counts global batches"),
                **dict.fromkeys(RUNTIME_KEYS, "free: how the run executes, logs, saves and evaluates")}


def resume_rule(key: str) -> str | None:
    """The rule a config key follows on resume (its own, or its section's), or None if it has none."""
    while key:
        if key in RESUME_RULES:
            return RESUME_RULES[key]
        key = key.rpartition(".")[0]
    return None


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

    defaults = config_record(Config())

    def before(key):  # a key newer than the checkpoint had its default there
        value = _get(saved, key)
        return _get(defaults, key) if value is None and key in ADDED_KEYS else value

    def changed(keys):
        return [f"{key} {before(key)!r} -> {_get(now, key)!r}" for key in keys if before(key) != _get(now, key)]

    if shape := changed(SHAPE_KEYS):
        raise ConfigError(f"checkpoint {checkpoint} holds a model of another shape ({'; '.join(shape)}): these "
                          "settings cannot change on resume. Use the checkpoint's values, or start a new run from "
                          "its weights where they fit (hylo export, then model.init_from)")
    if objective := changed(OBJECTIVE_KEYS):
        raise ConfigError(f"checkpoint {checkpoint} was trained with another objective ({'; '.join(objective)}): its "
                          "optimizer state belongs to other parameters. Resume with the checkpoint's values, or "
                          f"start the next stage as a new run from its weights (model.init_from={checkpoint})")
    order = changed(DATA_ORDER_KEYS)
    if order and not cfg.data.allow_source_change:
        raise ConfigError(f"checkpoint {checkpoint} saved its data position in the order these settings define, and "
                          f"they changed ({'; '.join(order)}): the first resumed step would read other documents. "
                          "Resume with the checkpoint's values, or data.allow_source_change=true to continue from the "
                          "same position in the new order")
    return changed(OPTIMISER_KEYS) + changed(LOSS_KEYS) + order + changed(DATA_NOTED_KEYS), changed(COMPUTE_KEYS)


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


def run_config(config_path: str | None, overrides: list[str]) -> tuple[Config, Path | None]:
    """The config `hylo train` runs with, and the checkpoint it was taken from (None if not from one):
    `config_path` and `overrides` as given, or — when they resume a run whose checkpoint records its config, and no
    --config was given — that config with the overrides on top (run.dir and checkpoint.resume always this
    command's, as is checkpoint.overwrite).  The config is read only from a trainer state that verifies against its
    checkpoint's manifest."""
    cfg = load_config(config_path, overrides)
    if cfg.checkpoint.resume == "none":
        return cfg, None
    from hylo.trainer.checkpointing import config_checkpoint

    if cfg.checkpoint.resume != "auto" and config_path is None and not any(o.startswith("run.dir=") for o in overrides):
        # a named checkpoint continues in its own run dir (not the default one, which may hold another run)
        own = Path(cfg.checkpoint.resume).resolve().parent
        if own.name == "checkpoints":
            overrides = [*overrides, f"run.dir={own.parent}"]
            cfg = load_config(config_path, overrides)

    ckpt_dir = Path(cfg.run.dir) / "checkpoints"
    explicit = None if cfg.checkpoint.resume == "auto" else Path(cfg.checkpoint.resume)
    try:
        found = config_checkpoint(ckpt_dir, explicit)
    except CheckpointError:
        return cfg, None  # the trainer refuses the named checkpoint with the full story
    if found is None:
        return cfg, None
    checkpoint, state = found
    record = state.get("config")
    if not isinstance(record, dict):
        return cfg, None
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    if config_path is not None:
        say(f"[hylo] note: resuming {checkpoint} with --config {config_path} as given, not the config that "
            "checkpoint was trained with", flush=True)
        return cfg, None
    # where to write and whether to write over another run are this command's to say, never inherited
    record = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(record), {
        "run": {"dir": cfg.run.dir},
        "checkpoint": {"resume": cfg.checkpoint.resume, "overwrite": cfg.checkpoint.overwrite}}))
    shown = [o for o in overrides if not o.startswith(("checkpoint.resume=", "run.dir="))]
    say(f"[hylo] resuming with the config {checkpoint} was trained with"
        + (f", and this command's overrides: {' '.join(shown)}" if shown else ""), flush=True)
    return load_config(None, overrides, base=record), checkpoint


def check_config_source(config_from: Path | None, resume_from: Path | None, saved: dict[str, Any]) -> None:
    """The run's config came from `config_from`'s trainer state; the trainer verified and chose `resume_from`.
    Where those differ (the newer one failed its full verification), the run may go on only if both were
    trained with the same settings: otherwise it would train one checkpoint's weights with another's config."""
    if config_from is None or resume_from is None or Path(config_from) == Path(resume_from):
        return
    from hylo.trainer.checkpointing import read_trainer_state

    ignore = ("run.dir", "checkpoint.resume", "checkpoint.overwrite")
    theirs, ours = read_trainer_state(config_from).get("config") or {}, saved.get("config") or {}
    keys = sorted(k for k in set(_flat(theirs)) | set(_flat(ours)) if k not in ignore
                  and _get(theirs, k) != _get(ours, k))
    if keys:
        shown = "; ".join(f"{k} {_get(ours, k)!r} there, {_get(theirs, k)!r} in the config read" for k in keys[:6])
        raise CheckpointError(f"this run's config was read from {config_from}, which then failed verification; the "
                              f"newest checkpoint that verifies, {resume_from}, was trained with other settings "
                              f"({shown}). Resume it by name so that its own config is used: hylo train --resume "
                              f"{resume_from}")


def _flat(record: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in record.items():
        keys += _flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"]
    return keys
