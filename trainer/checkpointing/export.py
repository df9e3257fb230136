"""`hylo export`: one consolidated safetensors file (plus the model config) from a sharded DCP checkpoint, and the
loader behind `model.init_from`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from hylo.models.lm import HybridLM
from hylo.trainer.checkpointing import find_checkpoint
from hylo.trainer.checkpointing import load_weights as load_checkpoint_weights
from hylo.trainer.config import load_config
from hylo.trainer.errors import CheckpointError, ConfigError


def run_config_for(checkpoint: Path, command: str = "export"):
    """The resolved config of the run that wrote `checkpoint`: the one saved in its trainer state (exactly what
    that step trained with), else the run's config.yaml (<run>/checkpoints/step_N -> <run>/config.yaml)."""
    from hylo.trainer.checkpointing import read_trainer_state

    record = read_trainer_state(checkpoint).get("config")
    if isinstance(record, dict):
        return load_config(base=record)
    path = checkpoint.parent.parent / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"hylo {command}: checkpoint {checkpoint} carries no config and there is no "
                              f"config.yaml beside its run (looked for {path}); the model cannot be rebuilt")
    return load_config(path)


def load_trained_model(checkpoint: Path, command: str = "export"):
    """(model, run config) rebuilt from `checkpoint` — a step folder, a run's checkpoints/ folder or a run dir —
    on the CPU."""
    checkpoint = find_checkpoint(checkpoint, command)
    cfg = run_config_for(checkpoint, command)
    model = HybridLM(cfg.model)
    load_checkpoint_weights(checkpoint, model)
    return model, cfg


def export(checkpoint: Path, out: Path, dtype: str = "bf16") -> Path:
    from safetensors.torch import save_file

    model, cfg = load_trained_model(checkpoint)
    cast = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tensors = {name: t.detach().to(cast).contiguous() for name, t in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    model_cfg = OmegaConf.to_container(OmegaConf.structured(cfg.model))
    save_file(tensors, str(out), metadata={"hylo_model_config": json.dumps(model_cfg), "dtype": dtype})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)  # safetensors creates the file 0600: others could not read a shared model
    out.with_suffix(".json").write_text(json.dumps(model_cfg, indent=2))
    return out


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Initialise `model` from a safetensors file; shapes and names must match exactly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ConfigError(f"model.init_from='{path}' does not exist (expected a .safetensors file from hylo export)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"model.init_from='{path}' is not a readable safetensors file: {err}") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    wrong = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"model.init_from='{path}' does not fit this model: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}, wrong shape {wrong[:5]}")
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(tensors[name].to(t.dtype))


def run(args) -> int:
    """`hylo export` (arguments: trainer/arguments.py)."""
    out = export(Path(args.checkpoint), Path(args.out), args.dtype)
    print(f"[hylo] wrote {out} and {out.with_suffix('.json')}")
    return 0
