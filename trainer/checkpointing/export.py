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
    """(model, run config) rebuilt from `checkpoint` — a step folder, a run's checkpoints/ folder, a run dir, or a
    safetensors file from `hylo export` (its model config in the metadata; the rest of the config the defaults) —
    on the CPU."""
    if Path(checkpoint).suffix == ".safetensors" and Path(checkpoint).is_file():
        from safetensors import safe_open

        with safe_open(str(checkpoint), "pt") as f:
            record = json.loads((f.metadata() or {}).get("hylo_model_config", "null"))
        if not isinstance(record, dict):
            raise CheckpointError(f"hylo {command}: {checkpoint} is not a hylo export (no model config in it)")
        cfg = load_config(base={"model": record})
        model = HybridLM(cfg.model)
        load_weights(model, str(checkpoint))
        return model, cfg
    checkpoint = find_checkpoint(checkpoint, command)
    cfg = run_config_for(checkpoint, command)
    model = HybridLM(cfg.model)
    load_checkpoint_weights(checkpoint, model)
    return model, cfg


def export(checkpoint: Path, out: Path, dtype: str = "bf16") -> Path:
    model, cfg = load_trained_model(checkpoint)
    return write_weights(model, cfg.model, out, dtype)


def write_weights(model: torch.nn.Module, model_config, out: Path, dtype: str = "bf16") -> Path:
    """One safetensors file of `model`'s weights (its config in the metadata) and the config as JSON beside it:
    what model.init_from takes."""
    from safetensors.torch import save_file

    cast = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tensors = {name: t.detach().to(cast).contiguous() for name, t in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    model_cfg = OmegaConf.to_container(OmegaConf.structured(model_config))
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


# The exported folder's Python files: transformers imports them (trust_remote_code); they only name hylo's classes.
HF_CONFIGURATION = """\"\"\"hylo's config for transformers: hylo's own class (hylo installed is the requirement).\"\"\"

from hylo.trainer.checkpointing.hf_model import HyloConfig

__all__ = ["HyloConfig"]
"""
HF_MODELING = """\"\"\"hylo's model for transformers: hylo's own layers (hylo installed is the requirement).\"\"\"

from hylo.trainer.checkpointing.hf_model import HyloCache, HyloConfig, HyloForCausalLM

__all__ = ["HyloCache", "HyloConfig", "HyloForCausalLM"]
"""
HF_FILES = {"configuration_hylo.py": HF_CONFIGURATION, "modeling_hylo.py": HF_MODELING}


def export_hf(checkpoint: Path, out: Path, dtype: str = "bf16", max_shard_size: str = "5GB") -> Path:
    """`hylo export --format hf`: `checkpoint`'s model as a Hugging Face folder (save_hf)."""
    model, cfg = load_trained_model(checkpoint)
    return save_hf(model, cfg.model, cfg.train.seq_len, cfg.data.tokenizer, out, dtype, max_shard_size)


def save_hf(model: torch.nn.Module, model_config, seq_len: int, tokenizer_path: str, out: Path,
            dtype: str = "bf16", max_shard_size: str = "5GB") -> Path:
    """A folder AutoModelForCausalLM / AutoTokenizer load offline: config.json (model_type hylo, auto_map), the
    weights (sharded with an index above `max_shard_size`), generation_config.json, the tokenizer and the modeling
    files (trainer/checkpointing/hf_model.py).  `model` itself is saved (wrapped, not copied)."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from hylo.trainer.checkpointing.hf_model import HyloConfig, HyloForCausalLM
    from hylo.trainer.data.tokenizer import eos_token, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    eos_text = eos_token(tokenizer)
    eos = tokenizer.token_to_id(eos_text)
    config = HyloConfig(hylo_model=OmegaConf.to_container(OmegaConf.structured(model_config)),
                        max_position_embeddings=seq_len, eos_token_id=eos, bos_token_id=eos, pad_token_id=eos,
                        architectures=["HyloForCausalLM"],
                        auto_map={"AutoConfig": "configuration_hylo.HyloConfig",
                                  "AutoModelForCausalLM": "modeling_hylo.HyloForCausalLM"})
    with torch.device("meta"):  # the wrapper's own model is never materialised: `model` takes its place
        hf = HyloForCausalLM(config)
    hf.model = model
    hf.generation_config = GenerationConfig(eos_token_id=eos, bos_token_id=eos, pad_token_id=eos)
    hf = hf.to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, max_shard_size=max_shard_size)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos_text, bos_token=eos_text, pad_token=eos_text,
                            model_max_length=seq_len).save_pretrained(out)
    for name, text in HF_FILES.items():
        (out / name).write_text(text)
    return out


def run(args) -> int:
    """`hylo export` (arguments: trainer/arguments.py)."""
    if args.format == "hf":
        out = export_hf(Path(args.checkpoint), Path(args.out), args.dtype, args.max_shard_size)
        print(f"[hylo] wrote {out}/: AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True) and "
              f"AutoTokenizer.from_pretrained('{out}') load it (hylo installed)")
        return 0
    out = export(Path(args.checkpoint), Path(args.out), args.dtype)
    print(f"[hylo] wrote {out} and {out.with_suffix('.json')}")
    return 0
