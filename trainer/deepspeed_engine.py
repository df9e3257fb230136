"""`train.engine=deepspeed`: the same model, data, schedule and logging inside `deepspeed.initialize` (ZeRO 0-3).

One source of truth: the DeepSpeed config is generated from ours (micro-batch and accumulation from
`train.batch_size`/`train.micro_batch_size`, clipping from `train.grad_clip`, bf16 from `train.dtype`, the stage
from `deepspeed.zero_stage`); `deepspeed.config` adds raw DeepSpeed keys on top but may not restate those.
Context parallelism works unchanged: the CP ops are swapped into the plain model before DeepSpeed wraps it, and
DeepSpeed averages gradients over every rank exactly as the torch engine does.

Checkpoints are DeepSpeed's own (`engine.save_checkpoint`) inside hylo's step folders, so the COMPLETE marker,
`keep_last`, `checkpoint.resume=auto`, the data-loader position and the RNG states work as with the torch engine.
DeepSpeed writes its files with `torch.save` (pickles): load only checkpoints you trust.  They resume on the
same number of ranks and ZeRO stage (DeepSpeed's universal-checkpoint conversion handles other layouts).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.checkpoint import MARKER, TRAINER_STATE, Checkpointer, CheckpointError, is_complete, set_rng_state
from trainer.config import Config, ConfigError
from trainer.data import inputs_and_targets
from trainer.optim import build_optimizer

# Keys hylo derives from its own config; restating them in deepspeed.config would create a second truth.
DERIVED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
           "bf16", "fp16", "zero_optimization.stage", "optimizer", "scheduler")


def unsupported(c: Config) -> str | None:
    """Why this config cannot run on the DeepSpeed engine, or None."""
    ds = c.deepspeed
    if ds.zero_stage not in (0, 1, 2, 3):
        return f"deepspeed.zero_stage={ds.zero_stage} is not one of 0, 1, 2, 3"
    if c.parallel.dp_shard:
        return ("parallel.dp_shard=true (FSDP2) and DeepSpeed's ZeRO both shard the model: with train.engine="
                "deepspeed use deepspeed.zero_stage=3 instead of parallel.dp_shard")
    if c.train.nan_policy == "skip":
        return ("train.nan_policy=skip is not supported with train.engine=deepspeed: DeepSpeed applies the optimizer "
                "step inside engine.step(), before the gradient norm can be checked; use train.nan_policy=stop")
    if c.checkpoint.async_save:
        return ("checkpoint.async_save is for the torch engine's DCP checkpoints; DeepSpeed writes its checkpoints "
                "synchronously: drop checkpoint.async_save or use train.engine=torch")
    for key in DERIVED:
        head, _, tail = key.partition(".")
        if head in ds.config and (not tail or tail in (ds.config[head] or {})):
            return (f"deepspeed.config.{key} is derived from hylo's config (train.batch_size, "
                    "train.micro_batch_size, train.grad_clip, train.dtype, deepspeed.zero_stage, optim.*, "
                    "schedule.*); set it there instead")
    return None


def require_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("train.engine=deepspeed needs DeepSpeed: pip install 'hylo[deepspeed]' (on machines "
                          "without a GPU also export DS_ACCELERATOR=cpu)") from None
    return deepspeed


def deepspeed_config(c: Config, micro: int, accum: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, derived from ours, with `deepspeed.config` merged on top."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": c.train.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": c.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,  # hylo's AdamW (decay on matrices only) is a client optimizer
        "steps_per_print": 10**9,  # hylo logs; keep DeepSpeed's own step prints out of the way
        "wall_clock_breakdown": False,
    }
    for key, value in c.deepspeed.config.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


class DeepSpeedEngine:
    """Wraps a plain (possibly context-parallel) model and hylo's optimizer in `deepspeed.initialize`; the same
    interface as trainer.engine.TorchEngine."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, c: Config, micro: int, accum: int, bf16: bool):
        deepspeed = require_deepspeed()
        self.config = deepspeed_config(c, micro, accum, bf16)
        device = next(model.parameters()).device
        self.optimizer = build_optimizer(model, c, device)  # the LR schedule drives its param groups
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.config,
                                               dist_init_required=False)
        self.model = self.engine
        self.accum, self.keep_last = accum, c.checkpoint.keep_last

    def autocast(self):
        return contextlib.nullcontext()  # the engine holds bf16 weights itself (its `bf16` section)

    def checkpointer(self, root: Path) -> DeepSpeedCheckpointer:
        return DeepSpeedCheckpointer(root, self.engine, keep_last=self.keep_last)

    def optimizer_step(self) -> None:
        pass  # already taken inside engine.step() at the last micro-batch

    def zero_grad(self) -> None:
        pass  # engine.step() zeroes the gradients

    def forward_backward(self, batch: torch.Tensor, cp_positions: torch.Tensor | None,
                         poison: bool = False) -> torch.Tensor:
        """One optimizer step's micro-batches: DeepSpeed scales each loss by 1/accum, reduces the gradients and,
        at the last micro-batch, clips and steps the optimizer.  Returns the step's mean loss."""
        step_loss = torch.zeros((), device=batch.device)
        for i in range(self.accum):
            inputs, targets = inputs_and_targets(batch[i], cp_positions)
            logits = self.engine(inputs, cp_positions)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            if poison:
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            step_loss += loss.detach() / self.accum
        return step_loss

    def clip_gradients(self) -> torch.Tensor:
        """DeepSpeed clipped inside engine.step(); the global gradient norm it saw before clipping."""
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else float(norm))

    def load(self, path: Path) -> dict[str, Any]:
        """Restore model, optimizer and RNG from a hylo step folder holding a DeepSpeed checkpoint; return the
        trainer state (step, schedule, data-loader position) saved beside them."""
        meta = read_trainer_state(path, expect_engine="deepspeed")
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        saved = (meta.get("world_size"), meta.get("zero_stage"))
        if saved != (world, self.config["zero_optimization"]["stage"]):
            raise CheckpointError(
                f"checkpoint '{path}' was written by {saved[0]} rank(s) at ZeRO stage {saved[1]}; this run has "
                f"{world} at stage {self.config['zero_optimization']['stage']}. Resume with the same layout, or "
                "convert it with DeepSpeed's ds_to_universal.py")
        try:
            loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        except (RuntimeError, OSError, KeyError, ValueError) as err:
            raise CheckpointError(f"checkpoint '{path}' does not fit this model/optimizer (different model shape "
                                  f"or corrupt files): {str(err).splitlines()[0][:500]}") from None
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no loadable checkpoint in '{path}'")
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rng = path / "rng" / f"rank_{rank}.json"
        if rng.is_file():
            set_rng_state(json.loads(rng.read_text()))
        return meta


def read_trainer_state(path: Path, expect_engine: str) -> dict[str, Any]:
    """trainer_state.json of a complete step folder, refusing one written by the other engine."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not is_complete(path):
        raise CheckpointError(f"checkpoint '{path}' is incomplete (no {MARKER} marker or {TRAINER_STATE}): it was "
                              "cut off while being written; point checkpoint.resume at an earlier step_<N> folder")
    try:
        meta = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{path}': {TRAINER_STATE} is unreadable ({err})") from None
    engine = meta.get("engine", "torch")
    if engine != expect_engine:
        raise CheckpointError(f"checkpoint '{path}' was written by train.engine={engine}; this run uses "
                              f"train.engine={expect_engine}. Resume with the engine that wrote it, or start a new "
                              f"run from its weights (hylo export, then model.init_from)")
    return meta


class DeepSpeedCheckpointer(Checkpointer):
    """hylo's step folders (tmp + rename, COMPLETE, keep_last, RNG per rank) around `engine.save_checkpoint`."""

    def __init__(self, root: Path, engine, *, keep_last: int = 0):
        super().__init__(root, keep_last=keep_last, async_save=False)
        self.engine = engine

    def _collect(self, model, optimizer, trainer_state: dict[str, Any]) -> tuple[dict, dict]:
        return {}, dict(trainer_state)  # DeepSpeed gathers model and optimizer states itself

    def _write(self, tmp: Path, state: dict) -> None:
        self.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)


def consolidated_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model weights of a DeepSpeed step folder, gathered from its ZeRO partitions (for eval,
    generate and export, which run without DeepSpeed's engine)."""
    deepspeed = require_deepspeed()  # noqa: F841 - the helper below lives in the package
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    meta = read_trainer_state(path, expect_engine="deepspeed")
    if meta.get("zero_stage", 0) == 0:  # no partitions: the module's weights are stored whole
        states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
