"""Start one hylo model from another's weights even when their layer patterns differ: what `model.init_from` does
with a hylo source (a `.safetensors` export, an `export --format hf` folder or a checkpoint), and how a distilled
student starts from its teacher.

Per block: the same layer type -> the whole block is copied (sinks, gates, decays included); another layer type ->
the block's norms and MLP are copied and its new mixer starts from the replaced attention layer's q/k/v/o through
the Hugging Face import's mapping (hf_import.py's table; the rest of the mixer keeps its own initialisation).  The
embedding, final norm and head are copied.  A source block that is not softmax attention has no q/k/v/o to give:
replacing it by another type is refused by name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from hylo.trainer.checkpointing.hf_import import HYLO, apply_shape, convert, import_into, is_hf_folder, read_hf_config
from hylo.trainer.errors import ConfigError

ATTENTION = ("full", "swa")
# The keys that fix a model's parameter shapes and what its shared parts compute: a student started from a source
# takes them from it (its pattern and layer options stay its own).
SHAPE = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "rope_theta",
         "norm_eps", "tie_embeddings", "mlp", "norm", "embed_scale")


def exported_model_config(path: Path) -> dict[str, Any] | None:
    """The model config inside a hylo `.safetensors` export, or None if it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            record = json.loads((f.metadata() or {}).get("hylo_model_config", "null"))
    except Exception:  # noqa: BLE001 - unreadable: the caller's loader says so with its own message
        return None
    return record if isinstance(record, dict) else None


def resolve_source(path: str | Path, what: str) -> Path:
    """A source's files: a run dir or checkpoints/ folder resolves to its newest complete step folder (so a run
    that goes on training does not change what a run started from it reads on resume)."""
    from hylo.trainer.checkpointing.step_folder import find_checkpoint

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what}='{path}' does not exist; give a Hugging Face model folder, a hylo export "
                          "(.safetensors or export --format hf folder) or a hylo checkpoint (run dir or step folder)")
    if path.is_file() or is_hf_folder(path):
        return path
    return find_checkpoint(path, f"train ({what})")


def source_model_config(path: Path):
    """The model config of a Hugging Face Llama-family folder (its attention layers as `full`, or `swa` under
    Mistral's window; no sinks, so hylo computes what the original does), a hylo HF export, a hylo `.safetensors`
    export or a hylo step folder — without reading the weights."""
    from hylo.trainer.checkpointing.export import run_config_for
    from hylo.trainer.config import ModelConfig, load_config

    if is_hf_folder(path):
        config = read_hf_config(path)
        cfg = ModelConfig()
        if config.get("architectures", [None])[0] != HYLO:
            cfg.pattern, cfg.attn.sink = ["full"], False
            window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
            if window and window < config.get("max_position_embeddings", window + 1):
                cfg.pattern, cfg.window = ["swa"], window
        apply_shape(cfg, config, given=set())
        return cfg
    if path.is_file():
        record = exported_model_config(path)
        if record is None:
            raise ConfigError(f"'{path}' is not a hylo export (no model config in it)")
        return load_config(base={"model": record}).model
    return run_config_for(path, "train").model


def load_source_model(path: str | Path, what: str):
    """(model, its model config) on the CPU in float32, from any source `source_model_config` reads (a run dir or
    checkpoints/ folder: its newest checkpoint).  `what` names the setting in messages."""
    from hylo.models.lm import HybridLM
    from hylo.trainer.checkpointing.export import load_trained_model

    path = resolve_source(path, what)
    if is_hf_folder(path):
        cfg = source_model_config(path)
        model = HybridLM(cfg)
        import_into(model, path)
        return model, cfg
    model, run_cfg = load_trained_model(path, "train")
    return model, run_cfg.model


def take_shape(model_cfg, source_cfg, what: str) -> None:
    """Set `model_cfg`'s SHAPE keys from the source's; one the user set to another value is refused by name.  The
    layer pattern, window and layer options (sinks, gates, RAT/BASED/TNL settings; never the kernel backends) are
    the source's too where this config leaves them at their defaults: a student keeps the pattern it names."""
    from hylo.trainer.config import ModelConfig

    default = ModelConfig()
    for key in SHAPE:
        ours, theirs = getattr(model_cfg, key), getattr(source_cfg, key)
        if ours != getattr(default, key) and ours != theirs:
            raise ConfigError(f"model.{key}={ours} disagrees with {what}'s {theirs}; drop model.{key} (the shape "
                              "comes from the model it starts from)")
        setattr(model_cfg, key, theirs)
    for key in ("pattern", "window"):
        if getattr(model_cfg, key) == getattr(default, key):
            setattr(model_cfg, key, getattr(source_cfg, key))
    for section in ("attn", "rat", "based", "tnl"):
        ours, theirs, initial = (getattr(c, section) for c in (model_cfg, source_cfg, default))
        for field in dataclasses.fields(ours):
            if field.name != "backend" and getattr(ours, field.name) == getattr(initial, field.name):
                setattr(ours, field.name, getattr(theirs, field.name))


def needs_transfer(init_from: str, pattern: list[str], n_layers: int) -> bool:
    """Whether model.init_from is a hylo source to map block by block (rather than load one to one): an HF export
    of hylo's or a checkpoint folder, or a `.safetensors` export of another layer pattern."""
    from hylo.models.lm import layer_types

    path = Path(init_from)
    if is_hf_folder(path):
        return read_hf_config(path).get("architectures", [None])[0] == HYLO
    if path.is_dir():
        return True
    if path.suffix == ".safetensors" and path.is_file() and (record := exported_model_config(path)):
        depth = record.get("n_layers", n_layers)  # the student takes the source's depth
        theirs = SimpleNamespace(pattern=record.get("pattern") or ["full"], n_layers=depth)
        return layer_types(theirs) != layer_types(SimpleNamespace(pattern=pattern, n_layers=depth))
    return False


def _llama_names(source, layers: set[int]) -> dict[str, torch.Tensor]:
    """The source's tensors under Hugging Face Llama names, for `convert` (its attention blocks in `layers`)."""
    cfg, state = source.cfg, source.state_dict()
    heads, kv = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    head_dim = cfg.head_dim or cfg.d_model // heads
    out = {"embed_tokens.weight": state["embed.weight"], "norm.weight": state["norm.weight"]}
    if "head.weight" in state:
        out["lm_head.weight"] = state["head.weight"]
    for i in layers:
        at, hf = f"blocks.{i}.", f"layers.{i}."
        out[hf + "input_layernorm.weight"] = state[at + "mixer_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = state[at + "mlp_norm.weight"]
        gate, up = state[at + "mlp.gate_up.weight"].chunk(2)
        out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate, up
        out[hf + "mlp.down_proj.weight"] = state[at + "mlp.down.weight"]
        q, k, v = state[at + "mixer.qkv.weight"].split([heads * head_dim, kv * head_dim, kv * head_dim])
        out[hf + "self_attn.q_proj.weight"], out[hf + "self_attn.k_proj.weight"] = q, k
        out[hf + "self_attn.v_proj.weight"] = v
        out[hf + "self_attn.o_proj.weight"] = state[at + "mixer.out.weight"]
    return out


def transfer(source, model, what: str) -> str:
    """Initialise `model` from `source` (both HybridLM, one shape, any patterns), in place; returns the note."""
    from hylo.models.lm import layer_types

    theirs, ours = layer_types(source.cfg), layer_types(model.cfg)
    if len(theirs) != len(ours) or source.cfg.d_model != model.cfg.d_model:
        raise ConfigError(f"{what} has {len(theirs)} layers of width {source.cfg.d_model}, this model "
                          f"{len(ours)} of {model.cfg.d_model}: a model starts only from one of its own shape")
    replaced = {i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b}
    for i in sorted(replaced):
        if theirs[i] not in ATTENTION:
            raise ConfigError(f"block {i} is {ours[i]} here but {theirs[i]} in {what}: only softmax attention "
                              "(full, swa) blocks can be replaced by another layer type; keep layer type "
                              f"{theirs[i]} at block {i}")
        if model.cfg.mlp != "swiglu":
            raise ConfigError("replacing attention blocks maps the source's SwiGLU MLP: model.mlp must be swiglu")
    report = convert(_llama_names(source, replaced), model, layers=replaced)
    own, given = model.state_dict(), source.state_dict()
    with torch.no_grad():
        for i in sorted(set(range(len(ours))) - replaced):
            prefix = f"blocks.{i}."
            mine, theirs_keys = ({k for k in state if k.startswith(prefix)} for state in (own, given))
            if mine != theirs_keys:
                only = sorted(k.removeprefix(prefix) for k in mine ^ theirs_keys)
                raise ConfigError(f"block {i} ({ours[i]}) has {', '.join(only)} on one side only: its layer options "
                                  f"differ from {what}'s (model.attn.sink/gate, model.rat.*, model.based.*, "
                                  "model.tnl.*); take the source's")
            for key in mine:
                if own[key].shape != given[key].shape:
                    raise ConfigError(f"'{key}' has shape {tuple(own[key].shape)} here but "
                                      f"{tuple(given[key].shape)} in {what}: its layer options differ")
                own[key].copy_(given[key])
    swaps = ", ".join(f"{i}: {theirs[i]} -> {ours[i]}" for i in sorted(replaced)) or "none"
    fresh = [key for key in report["fresh"] if any(key.startswith(f"blocks.{i}.mixer.") for i in replaced)]
    return (f"{len(ours) - len(replaced)} block(s) copied whole, {len(replaced)} replaced ({swaps}), their new "
            f"mixers from the attention weights where shapes allow ({len(report['derived'])} tensors derived, "
            f"{len(fresh)} fresh: {', '.join(fresh[:4])}{' ...' if len(fresh) > 4 else ''})")
