"""Start a hylo model from a local Hugging Face Llama-family folder: `hylo import --hf DIR --out W.safetensors` (the
pair `hylo export` writes, which model.init_from takes), or `model.init_from=DIR` in memory.

Shape from the HF config (vocab, width, depth, heads, KV heads, head dim, MLP width, RoPE base, norm eps, tied
head); the pattern and layer options from hylo's config; a shape key given on both sides that disagrees is refused
by name.  What maps, per block (the rest keeps hylo's own initialisation, and a note lists each kind):

  every block          input_layernorm -> mixer_norm, post_attention_layernorm -> mlp_norm,
                       mlp gate_proj|up_proj -> mlp.gate_up, down_proj -> mlp.down
  full, swa            q_proj|k_proj|v_proj -> qkv, o_proj -> out (GQA kept; RoPE conventions agree: both rotate
                       the halves of each head); sinks (model.attn.sink) start at -20, where the softmax is
                       unchanged to ~1e-9 per token
  tnl                  q, k, v (KV heads repeated to every head) -> qkvu's q|k|v, o_proj -> out; its output gate u
                       starts fresh
  based                v (KV heads repeated) -> qkv's v, and q/k where the feature dim equals the head dim;
                       o_proj -> out
  rat                  v (repeated) -> zvg's v, q/k where qk_groups match the heads/KV heads; o_proj -> out
  baseconv             nothing (its input projection and convolution have no attention counterpart)
  embed_tokens -> embed, norm -> norm, lm_head -> head (or tied)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hylo.trainer.errors import ConfigError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
HYLO = "HyloForCausalLM"  # hylo's own `export --format hf` folders come back as they left
SINK_START = -20.0


def is_hf_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"'{folder}' is not a Hugging Face model folder: it has no config.json")
    config = json.loads(path.read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch == HYLO:
        return config
    if arch not in ARCHITECTURES:
        raise ConfigError(f"'{folder}' holds a {arch}; hylo imports the Llama family ({', '.join(ARCHITECTURES)})")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"'{folder}': hidden_act={config['hidden_act']}; hylo's SwiGLU MLP uses silu")
    rope = config.get("rope_parameters") or {}
    if (rope.get("rope_type") or "default") != "default" or config.get("rope_scaling"):
        raise ConfigError(f"'{folder}': RoPE scaling ({rope.get('rope_type') or config.get('rope_scaling')}) is "
                          "not supported; hylo's RoPE is the plain one")
    if config.get("attention_bias") or arch == "Qwen2ForCausalLM":
        raise ConfigError(f"'{folder}': its attention projections have biases (attention_bias, or Qwen2's q/k/v "
                          "biases), which hylo's attention has no place for")
    if config.get("mlp_bias"):
        raise ConfigError(f"'{folder}': mlp_bias=true; hylo's MLP has no biases")
    return config


def model_settings(config: dict[str, Any]) -> dict[str, Any]:
    """hylo's model keys from an HF config (the shape; hylo's own config gives the rest)."""
    if config.get("architectures", [None])[0] == HYLO:  # all of it, the pattern included
        return {key: value for key, value in config["hylo_model"].items() if key != "init_from"}
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    return {"vocab_size": config["vocab_size"], "d_model": config["hidden_size"],
            "n_layers": config["num_hidden_layers"], "n_heads": heads,
            "n_kv_heads": config.get("num_key_value_heads") or heads,
            "head_dim": 0 if head_dim * heads == config["hidden_size"] else head_dim,
            "ffn_dim": config["intermediate_size"], "rope_theta": float(rope.get("rope_theta",
                                                                                 config.get("rope_theta", 10000.0))),
            "norm_eps": config.get("rms_norm_eps", 1e-6), "tie_embeddings": bool(config.get("tie_word_embeddings")),
            "mlp": "swiglu", "norm": "rms", "embed_scale": False}


def apply_shape(model_cfg, config: dict[str, Any], given: set[str]) -> list[str]:
    """Set `model_cfg`'s shape from the HF config; a key in `given` (set by the user) that disagrees is refused."""
    from hylo.trainer.config import ModelConfig

    default = ModelConfig()
    for key, value in model_settings(config).items():
        if isinstance(value, dict):  # a hylo export's nested layer options (attn, rat, ...): taken as they are
            setattr(model_cfg, key, type(getattr(default, key))(**value))
            continue
        ours = getattr(model_cfg, key)
        if (f"model.{key}" in given or ours != getattr(default, key)) and ours != value and key != "tie_embeddings":
            raise ConfigError(f"model.{key}={ours} disagrees with the Hugging Face config's {value}; drop "
                              f"model.{key} (the shape comes from the imported model)")
        setattr(model_cfg, key, value)
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window and window < config.get("max_position_embeddings", window + 1):  # Mistral v0.1: every layer windowed
        if any(kind != "swa" for kind in model_cfg.pattern if kind in ("full", "swa")) or model_cfg.window != window:
            raise ConfigError(f"the Hugging Face model attends within a sliding window of {window} tokens; its "
                              f"attention layers map to hylo's 'swa' with that window: set model.window={window} "
                              "and use swa instead of full in model.pattern")
    if getattr(model_cfg, "ffn_dim", 0) and model_cfg.mlp != "swiglu":
        raise ConfigError("model.mlp must be swiglu to take a Llama-family MLP")
    return sorted(model_settings(config))


def read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"] if (folder / "model.safetensors").is_file() else [])
    if not files:
        raise ConfigError(f"'{folder}' has no model.safetensors (or index); save it with save_pretrained "
                          "(safe_serialization, the default)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return {key.removeprefix("model."): value for key, value in tensors.items()}


def _repeat_heads(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """A k/v projection's KV heads repeated so each query head has its own (GQA's sharing made explicit)."""
    per = weight.shape[0] // kv_heads
    return weight.view(kv_heads, per, -1).repeat_interleave(heads // kv_heads, dim=0).reshape(heads * per, -1)


def convert(tensors: dict[str, torch.Tensor], model, layers: set[int] | None = None) -> dict[str, list[str]]:
    """Copy what maps from the HF tensors into hylo's `model` (in place); returns {copied, derived, fresh}.
    `layers`: only these blocks (the others are the caller's), else all."""
    cfg = model.cfg
    own = model.state_dict()
    report: dict[str, list[str]] = {"copied": [], "derived": [], "fresh": []}
    done: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ConfigError(f"the Hugging Face weights have no tensor '{name}' (not a Llama-family checkpoint?)")
        return tensors[name]

    def put(key: str, value: torch.Tensor, kind: str) -> None:
        if own[key].shape != value.shape:
            raise ConfigError(f"'{key}': the Hugging Face tensor has shape {tuple(value.shape)}, hylo's "
                              f"{tuple(own[key].shape)}")
        own[key].copy_(value.to(own[key].dtype))
        report[kind].append(key)
        done.add(key)

    def part(key: str, rows: slice, value: torch.Tensor, kind: str) -> None:
        if own[key][rows].shape == value.shape:
            own[key][rows].copy_(value.to(own[key].dtype))
            report[kind].append(f"{key}[{rows.start}:{rows.stop}]")

    heads, kv = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    with torch.no_grad():
        put("embed.weight", take("embed_tokens.weight"), "copied")
        put("norm.weight", take("norm.weight"), "copied")
        if model.head is not None:
            put("head.weight", tensors.get("lm_head.weight", take("embed_tokens.weight")), "copied")
        for i, block in enumerate(model.blocks):
            if layers is not None and i not in layers:
                continue
            hf, at = f"layers.{i}.", f"blocks.{i}."
            put(at + "mixer_norm.weight", take(hf + "input_layernorm.weight"), "copied")
            put(at + "mlp_norm.weight", take(hf + "post_attention_layernorm.weight"), "copied")
            put(at + "mlp.gate_up.weight", torch.cat([take(hf + "mlp.gate_proj.weight"),
                                                      take(hf + "mlp.up_proj.weight")]), "copied")
            put(at + "mlp.down.weight", take(hf + "mlp.down_proj.weight"), "copied")
            if hf + "self_attn.q_norm.weight" in tensors:
                raise ConfigError("the Hugging Face model normalises q and k per head (Qwen3's q_norm/k_norm), "
                                  "which hylo's attention does not")
            q, k, v = (take(hf + f"self_attn.{n}_proj.weight") for n in "qkv")
            o = take(hf + "self_attn.o_proj.weight")
            kind, mixer = block.layer_type, at + "mixer."
            if kind in ("full", "swa"):
                put(mixer + "qkv.weight", torch.cat([q, k, v]), "copied")
                put(mixer + "out.weight", o, "copied")
                if block.mixer.sink is not None:
                    own[mixer + "sink"].fill_(SINK_START)
                    report["derived"].append(mixer + "sink")
                continue
            k_all, v_all = _repeat_heads(k, kv, heads), _repeat_heads(v, kv, heads)
            n = q.shape[0]
            if kind == "tnl":
                for j, w in enumerate((q, k_all, v_all)):
                    part(mixer + "qkvu.weight", slice(j * n, (j + 1) * n), w, "derived" if j else "copied")
            elif kind == "based":
                f = heads * block.mixer.feature_dim
                part(mixer + "qkv.weight", slice(2 * f, 2 * f + n), v_all, "derived")
                part(mixer + "qkv.weight", slice(0, f), q, "copied")
                part(mixer + "qkv.weight", slice(f, 2 * f), k_all, "derived")
            elif kind == "rat":
                inner = own[mixer + "zvg.weight"].shape[0] // 3
                part(mixer + "zvg.weight", slice(inner, 2 * inner), v_all, "derived")
                g = own[mixer + "qk.weight"].shape[0] // 2
                part(mixer + "qk.weight", slice(0, g), q, "copied")
                part(mixer + "qk.weight", slice(g, 2 * g), k, "copied")
            if own[mixer + "out.weight"].shape == o.shape:
                put(mixer + "out.weight", o, "copied")
    touched = {entry.split("[")[0] for kind in ("copied", "derived") for entry in report[kind]}
    report["fresh"] = sorted(key for key in own if key not in touched)
    return report


def describe(report: dict[str, list[str]]) -> str:
    def short(entries: list[str]) -> str:
        return ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")

    return (f"{len(report['copied'])} tensors copied, {len(report['derived'])} derived ({short(report['derived'])}), "
            f"{len(report['fresh'])} fresh ({short(report['fresh']) or 'none'})")


def import_into(model, folder: Path) -> str:
    """model.init_from=DIR: `model` (built with apply_shape's settings) takes the folder's weights; the note."""
    tensors = read_hf_tensors(folder)
    if read_hf_config(folder).get("architectures", [None])[0] == HYLO:  # hylo's own names, one to one
        missing = sorted(set(model.state_dict()) - set(tensors))
        if missing:
            raise ConfigError(f"'{folder}' lacks {missing[:5]}: not a complete hylo export")
        model.load_state_dict({key: tensors[key] for key in model.state_dict()})
        return f"all {len(tensors)} tensors of a hylo export"
    return describe(convert(tensors, model))


def run(args) -> int:
    """`hylo import --hf DIR --out W.safetensors [--config X] [key=value ...]` (arguments: trainer/arguments.py)."""
    from hylo.models.lm import HybridLM
    from hylo.trainer.checkpointing.export import write_weights
    from hylo.trainer.config import load_config

    folder = Path(args.hf)
    cfg = load_config(args.config, args.overrides)
    given = {item.split("=", 1)[0] for item in args.overrides}
    apply_shape(cfg.model, read_hf_config(folder), given)
    model = HybridLM(cfg.model)
    note = describe(convert(read_hf_tensors(folder), model))
    out = write_weights(model, cfg.model, Path(args.out), args.dtype)
    tokenizer = folder / "tokenizer.json"
    print(f"[hylo] imported {folder} as layers {list(cfg.model.pattern)} x{cfg.model.n_layers}: {note}\n"
          f"[hylo] wrote {out} and {out.with_suffix('.json')}; train from it with model.init_from={out}"
          + (f" data.tokenizer={tokenizer}" if tokenizer.is_file() else ""), flush=True)
    return 0
