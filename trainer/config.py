"""The configuration schema: one typed dataclass tree, merged with a YAML file and `key=value` overrides.

The defaults of this tree *are* the tiny CPU config (`configs/tiny.yaml` spells them out), so `hylo train` with
no arguments trains something sensible.  Everything is checked before any work starts: an unknown key, a value
of the wrong type or an inconsistent combination raises `ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from hylo.models.lm import MIXERS
from hylo.trainer.errors import ConfigError

# The bundled configs (configs/ in the repository) install as the data-only package `hylo.configs`: found through
# the install, they are there from a wheel and from an editable checkout alike, whatever the working directory.
CONFIG_DIR = Path(next(iter(importlib.util.find_spec("hylo.configs").submodule_search_locations)))


@dataclass
class RunConfig:
    dir: str = "runs/tiny"  # all outputs of a run: tb/, checkpoints/, config.yaml


@dataclass
class AttentionLayerConfig:  # `full` and `swa` layers
    sink: bool = True  # learned per-head sink logit (initialised to 0) in every softmax denominator
    gate: bool = False  # head-wise sigmoid output gate (o * sigmoid(x W_g))
    pinned: int = 0  # window layers: the first N tokens stay visible to every query (StreamingLLM keeps 4)
    backend: str = "auto"  # the kernels these layers run (kernels/dispatch.py): auto | flash | triton | chunk | ...


@dataclass
class RatLayerConfig:  # `rat` layers
    chunk_size: int = 16  # L: recurrence inside chunks of L tokens, attention across chunk summaries
    qk_groups: int = 2  # query/key projections shared by groups of heads (tiled); 0 = one per head
    backend: str = "auto"  # auto | flash (the summaries' softmax on torch's flash kernel) | triton | chunk | naive


@dataclass
class BasedLayerConfig:  # `based` (Taylor linear attention) and `baseconv` layers
    feature_dim: int = 16  # q/k dimension per head before the 2nd-order Taylor feature map (1 + d + d^2 features)
    conv_kernel: int = 3  # BaseConv: depthwise causal convolution width
    conv_expand: int = 2  # BaseConv: inner width = conv_expand * d_model
    backend: str = "auto"  # the Taylor linear attention's kernels: auto | triton | chunk | naive


@dataclass
class TnlLayerConfig:  # `tnl` layers
    hidden: int = 0  # q/k/v/u width; 0 = d_model
    lrpe: bool = False  # learnable relative position encoding (doubles the q/k dims)
    backend: str = "auto"  # lightning attention's kernels: auto | triton | chunk | naive


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0 = the tokenizer's vocabulary, padded up to a multiple of 64
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads (no grouped-query attention)
    head_dim: int = 0  # 0 = d_model // n_heads
    ffn_dim: int = 0  # 0 = SwiGLU width 8/3 * d_model rounded up to a multiple of 64
    pattern: list[str] = field(default_factory=lambda: ["swa", "full"])  # repeated to n_layers
    window: int = 64  # sliding window of `swa` layers: a query sees itself and the window-1 tokens before it
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    init_from: str = ""  # start from these weights (a safetensors file from `hylo export`) instead of random
    mlp_tile: int = 0  # tokens per tile of each MLP, recomputed tile by tile in backward; 0 = the whole sequence
    mlp: str = "swiglu"  # swiglu | sglu (TNL: W3(W1 x * W2 x), no activation) | gelu (4x, RAT's reference)
    norm: str = "rms"  # rms (with weight) | srms (TNL's SRMSNorm, no weight)
    embed_scale: bool = False  # multiply embeddings by sqrt(d_model) (TNL)
    # with data.document_masking: positions restart at every document start (off: each row's positions, so the
    # model keeps seeing positions up to train.seq_len however short the documents)
    document_positions: bool = False
    attn: AttentionLayerConfig = field(default_factory=AttentionLayerConfig)
    rat: RatLayerConfig = field(default_factory=RatLayerConfig)
    based: BasedLayerConfig = field(default_factory=BasedLayerConfig)
    tnl: TnlLayerConfig = field(default_factory=TnlLayerConfig)


@dataclass
class MQARDataConfig:  # data.format=mqar: synthetic multi-query associative recall (seq_len = train.seq_len)
    pairs: int = 8  # key-value pairs per sequence; every key is queried once after them
    n_keys: int = 64
    n_values: int = 64  # model.vocab_size must be >= 1 + n_keys + n_values


@dataclass
class UpsampleConfig:  # data.sources[i].upsample_long
    min_tokens: int = 0  # documents at least this many tokens long ...
    factor: int = 1  # ... appear this many times per epoch (copies spread by the seed, never back to back)


@dataclass
class SourceConfig:  # one entry of data.sources: a weighted source of a mixture
    name: str = ""
    path: str = ""  # as data.path: files, a folder, a glob, an HF dataset name or a token-shard folder
    weight: float = 1.0  # share of the sequences (normalised over the sources); 0 keeps it listed, never read
    format: str = "auto"
    text_field: str = "text"
    hf_split: str = "train"
    min_doc_tokens: int = 0  # drop documents shorter than this (a stage that wants only long ones)
    upsample_long: UpsampleConfig = field(default_factory=UpsampleConfig)
    max_epochs: int = 0  # stop drawing from it after this many epochs (its weight goes to the others); 0 = never


@dataclass
class DataConfig:
    path: str = ""  # files, a folder, a glob or a Hugging Face dataset name; empty = the bundled corpus
    format: str = "auto"  # auto | text | jsonl | parquet | hf | tokens (a `hylo tokenize --out` folder; auto-detected)
    text_field: str = "text"  # column holding the document text (jsonl, parquet, hf)
    hf_split: str = "train"
    tokenizer: str = ""  # path to a tokenizer.json; empty = the bundled byte-level BPE
    prefetch: int = 4  # batches prepared ahead by the background thread (0 = inline)
    verify: bool = True  # token shards: check every shard's CRC32 when opening
    allow_source_change: bool = False  # resume even if the files/dataset/tokenizer changed since the checkpoint
    # documents held out of training by a stable hash of their text (streaming sources); evaluation reads them
    val_fraction: float = 0.0
    split: str = "train"  # which side of val_fraction a reader takes: train | val (set by evaluation, not by hand)
    # a mixture of weighted sources instead of data.path (trainer/data/mixture.py); each takes path, format, text_field
    # and hf_split of its own, the other data.* settings apply to all
    sources: list[SourceConfig] = field(default_factory=list)
    # no layer lets a token see the documents packed before it (boundaries: the EOS tokens the packer writes)
    document_masking: bool = False
    mqar: MQARDataConfig = field(default_factory=MQARDataConfig)


@dataclass
class TrainConfig:
    steps: int = 300
    seq_len: int = 128
    batch_size: int = 16  # sequences per optimizer step, summed over all data-parallel ranks
    micro_batch_size: int = 0  # sequences per forward pass on one rank; 0 = batch_size / dp (no accumulation)
    lr: float = 3e-3
    seed: int = 0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    # torch.compile each block: on | off | auto (on for CUDA runs, unless selective checkpointing or a forward-hook
    # monitor due (logging.sink_interval / layer_interval with such layers) needs eager blocks; if compiling fails
    # at the first step, the run says why and trains eagerly).  true/false mean on/off.
    compile: str = "auto"
    # tokens per chunk of the output head + cross-entropy (models/loss.py): the full logits never exist.  4096
    # keeps one chunk's fp32 logits at 512 MiB with a 32K vocabulary, at the cost of a second head matmul in
    # backward (~2% of a 1B model's step); a micro-batch of at most this many tokens takes the plain path.
    # 0 = always the full logits.
    loss_chunk: int = 4096
    # none | selective (recompute norms, projections and MLPs; keep each mixer op's outputs) | full (keep only
    # each block's input) | auto (the first of none, selective, full whose `hylo plan` fits the device's memory,
    # decided when the run starts); true/false mean full/none.  What each layer keeps: docs/memory.md.
    activation_checkpointing: str = "auto"
    # move what is saved for backward (the checkpointed block inputs, at least) to pinned host memory during
    # forward and fetch it back ahead of use in backward (GPU runs only)
    activation_offload: bool = False
    deterministic: bool = False  # torch.use_deterministic_algorithms
    # Triton attention backward: deterministic (own dQ kernel, bit-reproducible) | atomic (FlashAttention-2's
    # atomic dQ: one pass over the scores, float32 sums in arrival order)
    attention_dq: str = "deterministic"
    device: str = "auto"  # auto | cpu | cuda
    # CPU runs: intra-op threads per rank; 0 = the cores this process may use, shared by the node's ranks, less
    # the load other work puts on them (OMP_NUM_THREADS, when set, is honoured instead)
    cpu_threads: int = 0
    check_memory: bool = True  # CPU runs: refuse before allocating when hylo plan's model says it cannot fit
    nan_policy: str = "stop"  # a non-finite loss/gradient: stop (exit 1, save nothing new) | skip (drop the step)
    engine: str = "torch"  # torch (DDP/FSDP2, DCP checkpoints) | deepspeed (ZeRO, DeepSpeed checkpoints)
    # what the model learns (docs/distillation.md): lm (next-token prediction) | align (each layer whose mixer
    # differs from distill.teacher's matches that layer's attention output, given the teacher's own hidden states)
    # | distill (the teacher's next-token distribution, end to end)
    objective: str = "lm"


@dataclass
class DistillConfig:  # train.objective=align|distill: a hybrid made from a trained transformer
    # the teacher: a Hugging Face Llama-family folder, a hylo export (a .safetensors file or an `export --format
    # hf` folder) or a hylo checkpoint (step folder, checkpoints/ or run dir); frozen, its identity recorded
    teacher: str = ""
    temperature: float = 1.0  # distill: both distributions at softmax temperature T; the KL is scaled by T^2
    lm_weight: float = 0.0  # distill: + lm_weight x the student's own next-token cross-entropy
    # align: the blocks that train (each its mixer alone); empty = every block whose layer type differs from the
    # teacher's at that depth
    align_layers: list[int] = field(default_factory=list)


@dataclass
class OptimConfig:
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only, never to norms or biases
    fused: str = "auto"  # auto (fused kernel where the device has one) | on | off


@dataclass
class ScheduleConfig:
    warmup_steps: int = 30
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1  # final lr as a fraction of train.lr


@dataclass
class ParallelConfig:
    dp_shard: bool = False  # FSDP2 (fully_shard) instead of DDP across data-parallel ranks
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    cp: int = 1  # context parallel: ranks sharing each sequence (the other world/cp ranks are data parallel)
    cp_mode: str = "ring"  # how full attention splits: ring (zigzag) | ulysses (all-to-all) | hybrid
    ulysses: int = 1  # cp_mode=hybrid: Ulysses ranks inside each ring slot (cp = ulysses x ring)


@dataclass
class DeepSpeedConfig:  # train.engine=deepspeed: batch sizes, clipping and precision come from `train`
    zero_stage: int = 2  # 0 (plain data parallel) | 1 (optimizer states) | 2 (+ gradients) | 3 (+ parameters)
    config: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed keys merged on top (advanced; see README)


@dataclass
class CheckpointConfig:
    interval: int = 100  # save every N steps (and at the last step); 0 = never
    resume: str = "auto"  # auto (latest in run.dir, if any) | none | a checkpoint folder
    keep_last: int = 0  # keep only the newest k complete checkpoints; 0 = keep all
    async_save: bool = False  # write in the background (dcp.async_save); also spelled checkpoint.async
    checksums: bool = True  # write a CRC32 manifest with each checkpoint and verify it before loading
    # write into a run dir holding another run's checkpoints (another lineage): they move aside to
    # <run.dir>/superseded/<lineage>/ instead of being replaced step by step; false = refuse by name
    overwrite: bool = False


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between TensorBoard points
    progress: bool = True  # tqdm bar on rank 0
    peak_tflops: float = 0.0  # device peak for MFU; 0 = a table for known GPUs, a measured matmul on CPU
    sink_interval: int = 50  # steps between attention-sink reports (sinks/layer{i}/...); 0 = off
    sink_threshold: float = 0.3  # mean received attention above which a non-first position is a secondary sink
    sink_queries: int = 64  # queries sampled per layer for the received-attention column sums
    layer_interval: int = 50  # steps between per-layer gradient norms and linear-attention state norms; 0 = off
    spike_zscore: float = 6.0  # flag a step whose loss exceeds the running mean by this many std devs; 0 = off


@dataclass
class EvalConfig:
    interval: int = 0  # steps between held-out evaluations (and at the last step); 0 = off
    # held-out data; auto = the run's own held-out documents (data.val_fraction > 0), else the bundled corpus's
    # validation split
    data_path: str = "auto"
    seq_len: int = 0  # 0 = train.seq_len; longer measures extrapolation (not under context parallelism)
    batches: int = 4  # global batches per evaluation (the same ones every time)
    batch_size: int = 4  # sequences per batch per data-parallel rank
    bucket: int = 0  # tokens per position bucket of eval/ppl_by_position; 0 = automatic
    tasks: list[str] = field(default_factory=lambda: ["ppl"])  # any of ppl, mqar, passkey
    mqar_samples: int = 256  # MQAR sequences scored (settings from data.mqar; seq_len = train.seq_len)
    passkey_lengths: list[int] = field(default_factory=list)  # empty = train.seq_len / 4, / 2, x 1 and x 2
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 4  # random pass keys per (length, depth) cell


@dataclass
class ProfileConfig:
    enabled: bool = False  # torch.profiler trace of steps [start_step, start_step + steps) into <run>/tb/profile
    start_step: int = 5
    steps: int = 3
    memory_snapshot: bool = True  # GPU: record allocations, dump <run>/oom_snapshot_rank<r>.pickle on out-of-memory


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": ("auto", "text", "jsonl", "parquet", "hf", "tokens", "mqar"),
    "train.dtype": ("auto", "bf16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"),
    "optim.fused": ("auto", "on", "off"),
    "schedule.decay": ("cosine", "linear", "constant"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "parallel.cp_mode": ("ring", "ulysses", "hybrid"),
    "model.mlp": ("swiglu", "sglu", "gelu"),
    "model.norm": ("rms", "srms"),
    "train.nan_policy": ("stop", "skip"),
    "train.engine": ("torch", "deepspeed"),
    "train.objective": ("lm", "align", "distill"),
    "data.split": ("train", "val"),
    "train.attention_dq": ("deterministic", "atomic"),
    "train.activation_checkpointing": ("auto", "none", "selective", "full"),
    "train.compile": ("auto", "on", "off"),
    # which kernels each layer type runs (kernels/dispatch.py); auto picks per call
    "model.attn.backend": ("auto", "flash", "triton", "chunk", "sdpa", "naive"),
    "model.rat.backend": ("auto", "flash", "triton", "chunk", "naive"),
    "model.based.backend": ("auto", "triton", "chunk", "naive"),
    "model.tnl.backend": ("auto", "triton", "chunk", "naive"),
}


def _allowed_keys(parent: str) -> list[str]:
    node = OmegaConf.select(OmegaConf.structured(Config), parent) if parent else OmegaConf.structured(Config)
    return list(node.keys()) if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if (isinstance(err, ConfigKeyError) or "not in" in str(err)) and getattr(err, "object_type", None) in (
            SourceConfig, UpsampleConfig):  # inside an entry of data.sources
        kind = "a data.sources entry" if err.object_type is SourceConfig else "upsample_long"
        allowed = [f.name for f in dataclasses.fields(err.object_type)]
        hint = difflib.get_close_matches(key.rpartition(".")[2], allowed, n=1)
        return ConfigError(f"unknown key '{key.rpartition('.')[2]}' in {kind} (from {source}). Allowed keys: "
                           f"{', '.join(allowed)}." + (f" Did you mean '{hint[0]}'?" if hint else ""))
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        parent, _, leaf = key.rpartition(".")
        allowed = _allowed_keys(parent)
        hint = difflib.get_close_matches(leaf, allowed, n=1)
        msg = f"unknown config key '{key}' (from {source})."
        if allowed:
            msg += f" Allowed keys under '{parent or '<top>'}': {', '.join(allowed)}."
        if hint:
            msg += f" Did you mean '{(parent + '.') if parent else ''}{hint[0]}'?"
        return ConfigError(msg)
    if isinstance(err, ValidationError):
        first = str(err).splitlines()[0]
        return ConfigError(f"bad value for config key '{key}' (from {source}): {first}")
    return ConfigError(f"invalid configuration (from {source}): {str(err).splitlines()[0]}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Schema defaults <- YAML file (or `base`, a saved run's config as a dict) <- dot-list overrides, validated.
    Returns a typed `Config` object."""
    schema = OmegaConf.structured(Config)
    cfg: DictConfig = schema
    try:
        if base is not None:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(base))
        if path is not None:
            path = Path(path)
            for bundled in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):  # `--config hybrid_tiny` works too
                if not path.is_file() and len(path.parts) == 1 and bundled.is_file():
                    path = bundled
            if not path.is_file():
                known = sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
                raise ConfigError(f"config file '{path}' does not exist. Bundled configs in {CONFIG_DIR}: {known}")
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ConfigError(f"config file {where} is not valid YAML ({problem}); fix that line") from None
            if "async" in (loaded.get("checkpoint") or {}):  # `async` is a Python keyword: the field is async_save
                loaded.checkpoint.async_save = loaded.checkpoint.pop("async")
            cfg = OmegaConf.merge(cfg, loaded)
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=100)")
            if item.startswith("checkpoint.async="):
                item = "checkpoint.async_save=" + item.split("=", 1)[1]
            try:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
            except OmegaConfBaseException as err:
                raise _explain(err, f"override '{item}'") from None
            except yaml.YAMLError as err:  # the value is parsed as YAML: an unclosed [ or {, a stray quote
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ConfigError(f"override '{item}': its value is not valid YAML ({problem}); close every [ and {{ "
                                  "and quote the value if it holds spaces, e.g. 'data.sources=[{name: a, path: x}]'"
                                  ) from None
    except OmegaConfBaseException as err:
        raise _explain(err, str(path)) from None
    config: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(config)
    return config


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def validate(c: Config) -> None:
    """Cross-field checks the types alone cannot express.  What depends on the number of ranks or the engine
    is checked when the run starts (trainer.trainer.run_problem)."""
    if bad := next(_non_finite(c), None):
        raise ConfigError(f"{bad[0]}={bad[1]} is not a finite number; give a real value")
    legacy = {"true": "full", "false": "none"}  # the setting was a boolean before it had policies
    c.train.compile = {"true": "on", "false": "off"}.get(str(c.train.compile).lower(), str(c.train.compile).lower())
    c.train.activation_checkpointing = legacy.get(c.train.activation_checkpointing.lower(),
                                                  c.train.activation_checkpointing)
    for key, allowed in CHOICES.items():
        value = functools.reduce(getattr, key.split("."), c)
        if value not in allowed:
            raise ConfigError(f"{key}='{value}' is not one of {list(allowed)}")

    m, t = c.model, c.train
    positive = {
        "model.d_model": m.d_model, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
        "train.steps": t.steps, "train.seq_len": t.seq_len, "train.batch_size": t.batch_size,
        "logging.interval": c.logging.interval,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {t.lr}")
    if t.deterministic and t.attention_dq == "atomic":
        raise ConfigError("train.attention_dq=atomic adds gradients in arrival order, which train.deterministic=true "
                          "rules out; use train.attention_dq=deterministic")
    if not m.pattern:
        raise ConfigError(f"model.pattern is empty; give a list of layer types from {sorted(MIXERS)}")
    for name in m.pattern:
        if name not in MIXERS:
            raise ConfigError(f"model.pattern entry '{name}' is not a layer type; known: {sorted(MIXERS)}")
    if m.head_dim == 0 and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
            "change one of them or set model.head_dim explicitly"
        )
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        raise ConfigError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={kv} (grouped queries)")
    if (m.head_dim or m.d_model // m.n_heads) % 2:
        raise ConfigError("the head dimension must be even for rotary embeddings; adjust model.d_model/n_heads")
    for name in sorted(set(m.pattern)):
        problem = MIXERS[name].check_config(c)
        if problem:
            raise ConfigError(problem)
    if min(c.eval.interval, c.eval.seq_len, c.eval.bucket) < 0 or c.eval.batches < 1 or c.eval.batch_size < 1:
        raise ConfigError("eval.interval, eval.seq_len and eval.bucket must be >= 0; eval.batches and "
                          "eval.batch_size >= 1")
    for task in c.eval.tasks:
        if task not in ("ppl", "mqar", "passkey"):
            raise ConfigError(f"eval.tasks entry '{task}' is not one of ['ppl', 'mqar', 'passkey']")
    if c.data.format == "mqar" or "mqar" in c.eval.tasks:
        q = c.data.mqar
        if q.pairs < 1 or q.n_keys < q.pairs or q.n_values < 1:
            raise ConfigError(f"data.mqar needs 1 <= pairs <= n_keys and n_values >= 1, got {q}")
        if t.seq_len < 4 * q.pairs:
            raise ConfigError(f"data.mqar.pairs={q.pairs} needs train.seq_len >= {4 * q.pairs} (the pairs, then a "
                              f"query for each); got {t.seq_len}")
        if m.vocab_size and m.vocab_size < 1 + q.n_keys + q.n_values:
            raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than MQAR's 1 + n_keys + n_values = "
                              f"{1 + q.n_keys + q.n_values}")
    if c.parallel.cp > 1 and c.eval.interval and {"mqar", "passkey"} & set(c.eval.tasks):
        raise ConfigError("eval.tasks mqar and passkey score whole sequences and do not run under parallel.cp > 1; "
                          "evaluate them afterwards with `hylo eval --task mqar|passkey`")
    if c.data.format == "mqar" and "ppl" in c.eval.tasks and c.eval.interval:
        raise ConfigError("data.format=mqar trains on synthetic recall sequences; held-out text perplexity means "
                          "nothing there: set eval.tasks=[mqar]")
    if t.compile == "on" and t.activation_checkpointing == "selective":
        raise ConfigError("train.activation_checkpointing=selective does not compile (torch.compile skips the "
                          "selectively checkpointed blocks); use train.compile=off (or auto), or checkpointing "
                          "none/full")
    if c.data.document_masking and c.data.format == "mqar":
        raise ConfigError("data.document_masking splits text at EOS tokens; MQAR sequences are one document each "
                          "(and their ids are not text): drop data.document_masking")
    if c.model.document_positions and not c.data.document_masking:
        raise ConfigError("model.document_positions=true restarts positions at document boundaries, which only "
                          "data.document_masking=true marks; set both")
    if c.profile.enabled and (c.profile.start_step < 1 or c.profile.steps < 1):
        raise ConfigError("profile.start_step and profile.steps must be >= 1")
    if c.parallel.cp > 1 and c.eval.seq_len not in (0, t.seq_len):
        raise ConfigError(f"eval.seq_len={c.eval.seq_len} differs from train.seq_len={t.seq_len}, which context "
                          "parallelism lays out; evaluate longer lengths afterwards with `hylo eval --seq-len`")
    check_sources(c.data)
    check_distill(c)
    if not 0.0 <= c.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={c.data.val_fraction} must lie in [0, 1) (e.g. 0.01 holds out 1% of "
                          "the documents)")
    if c.schedule.warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps={c.schedule.warmup_steps} must be >= 0")
    if not 0.0 <= c.schedule.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio={c.schedule.min_lr_ratio} must lie in [0, 1]")
    if len(c.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in c.optim.betas):
        raise ConfigError(f"optim.betas={c.optim.betas} must be two numbers in [0, 1)")
    if min(t.micro_batch_size, c.checkpoint.interval, c.checkpoint.keep_last, t.grad_clip, c.data.prefetch,
           t.loss_chunk, m.mlp_tile, t.cpu_threads) < 0:
        raise ConfigError("train.micro_batch_size, checkpoint.interval, checkpoint.keep_last, train.grad_clip, "
                          "train.loss_chunk, model.mlp_tile, train.cpu_threads and data.prefetch must be >= 0")


def check_distill(c: Config) -> None:
    """train.objective and distill.*: a teacher exactly when the objective needs one, sensible knobs."""
    t, d = c.train, c.distill
    if t.objective == "lm":
        if d.teacher:
            raise ConfigError(f"distill.teacher='{d.teacher}' is set but train.objective=lm trains on the data "
                              "alone; set train.objective=align or distill, or drop distill.teacher")
        return
    if not d.teacher:
        raise ConfigError(f"train.objective={t.objective} learns from a teacher: set distill.teacher=PATH (a "
                          "Hugging Face folder, a hylo export or a hylo checkpoint)")
    if not d.temperature > 0:
        raise ConfigError(f"distill.temperature={d.temperature} must be positive (1 = the plain distributions)")
    if d.lm_weight < 0:
        raise ConfigError(f"distill.lm_weight={d.lm_weight} must be >= 0")
    if any(i < 0 for i in d.align_layers):  # (their upper bound is the student's depth, known once it is built)
        raise ConfigError(f"distill.align_layers={d.align_layers}: block indices start at 0")
    if c.data.format == "mqar":
        raise ConfigError("train.objective=align|distill learns from a teacher on text; data.format=mqar's "
                          "synthetic ids mean nothing to it: use a text source")


def check_sources(d: DataConfig) -> None:
    """data.sources: named, unique, weights >= 0 and not all zero, not beside data.path."""
    if not d.sources:
        return
    if d.path:
        raise ConfigError(f"data.path='{d.path}' and data.sources are both set: data.path is the one-source "
                          "shorthand; list it as a source instead")
    if d.format == "mqar":
        raise ConfigError("data.format=mqar generates its sequences; it takes no data.sources")
    names = [s.name for s in d.sources]
    for i, src in enumerate(d.sources):
        where = f"data.sources[{i}]"
        if not src.name or not src.path:
            raise ConfigError(f"{where} needs a name and a path (e.g. {{name: code, path: data/code, weight: 0.3}})")
        if names.count(src.name) > 1:
            raise ConfigError(f"{where}: the name '{src.name}' is used twice; give every source its own name")
        if not 0 <= src.weight < float("inf"):
            raise ConfigError(f"{where} ({src.name}): weight={src.weight} must be >= 0")
        if src.min_doc_tokens < 0 or src.max_epochs < 0 or src.upsample_long.min_tokens < 0:
            raise ConfigError(f"{where} ({src.name}): min_doc_tokens, max_epochs and upsample_long.min_tokens "
                              "must be >= 0")
        if src.upsample_long.factor < 1:
            raise ConfigError(f"{where} ({src.name}): upsample_long.factor={src.upsample_long.factor} must be >= 1 "
                              "(1 = no upsampling)")
        if src.format not in CHOICES["data.format"] or src.format == "mqar":
            raise ConfigError(f"{where} ({src.name}): format='{src.format}' is not one of "
                              f"{[f for f in CHOICES['data.format'] if f != 'mqar']}")
    if sum(src.weight for src in d.sources) <= 0:
        raise ConfigError("data.sources: every weight is 0; give at least one source a positive weight")


def _non_finite(node: Any, prefix: str = ""):
    """(key, value) of every float setting that is nan or infinite (YAML and the command line both accept them)."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _non_finite(value, f"{prefix}{f.name}.")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                yield f"{prefix}{f.name}", value


def compile_choice(c: Config, device_type: str, checkpointing: str | None = None) -> tuple[bool, str | None]:
    """(whether the blocks are compiled, a note saying why `auto` kept them eager where that is not obvious);
    `checkpointing`: the policy the run applies (what train.activation_checkpointing=auto chose)."""
    t, log = c.train, c.logging
    checkpointing = checkpointing or t.activation_checkpointing
    if t.compile != "auto":
        return t.compile == "on", None
    if device_type != "cuda":
        return False, None  # CPU runs stay eager: compiling costs more than the small steps it would speed up
    if checkpointing == "selective":
        return False, "train.compile=auto: blocks stay eager (selective checkpointing does not compile)"
    if t.engine == "deepspeed" or c.parallel.cp > 1:  # not yet measured compiled: ZeRO's hooks, CP's collectives
        what = "DeepSpeed (its ZeRO parameter hooks)" if t.engine == "deepspeed" else "context parallelism (its " \
            "collectives inside the blocks)"
        return False, f"train.compile=auto: blocks stay eager under {what}; train.compile=on compiles anyway"
    if c.data.document_masking:  # the ops read the boundaries on the host: a graph per piece, recompiled per batch
        return False, ("train.compile=auto: blocks stay eager with data.document_masking (the ops read each "
                       "batch's document boundaries, which breaks and re-specialises the graphs); "
                       "train.compile=on compiles anyway")
    groups = {MIXERS[k].monitor_group for k in c.model.pattern}
    hooks = [f"logging.{key}={value}" for group, key, value in (("sinks", "sink_interval", log.sink_interval),
                                                                ("states", "layer_interval", log.layer_interval))
             if group in groups and value]
    if hooks:
        return False, (f"train.compile=auto: blocks stay eager, because the layer monitors ({', '.join(hooks)}) "
                       "read each layer through forward hooks a compiled block does not run; set those to 0 to "
                       "compile, or train.compile=on to compile without the monitors")
    return True, None


def check_batch_layout(c: Config, dp: int) -> tuple[int, int]:
    """(sequences per micro-batch on one rank, micro-batches per step) for `dp` data-parallel ranks."""
    b = c.train.batch_size
    if b % dp:
        options = [n for n in range(dp, 8 * dp + 1, dp)]
        raise ConfigError(
            f"train.batch_size={b} (global sequences per step) is not divisible by the {dp} data-parallel ranks; "
            f"use a multiple of {dp}, e.g. one of {options[:4]}"
        )
    local = b // dp
    micro = c.train.micro_batch_size or local
    if local % micro:
        raise ConfigError(
            f"train.micro_batch_size={micro} must divide the per-rank batch {local} "
            f"(train.batch_size={b} / {dp} ranks)"
        )
    return micro, local // micro


def held_out_data(cfg: Config, path: str = "auto") -> tuple[DataConfig, str | None]:
    """The data evaluation reads for `path` ('auto': the run's own held-out documents when data.val_fraction > 0,
    else the bundled corpus's validation split) and, when the run trained on other data than that, a note."""
    data = dict(cfg.data.__dict__, prefetch=0)
    if path == "auto" and cfg.data.val_fraction > 0:
        return DataConfig(**{**data, "split": "val"}), None
    path = "bundled:val" if path == "auto" else path
    note = None
    if path == "bundled:val" and (cfg.data.path not in ("", "bundled:train") or cfg.data.sources):
        note = (f"[hylo] note: the model trained on {cfg.data.path or 'data.sources'}; perplexity is measured on the "
                "bundled corpus's "
                "validation split (set data.val_fraction when training to hold out documents of your own, or "
                "give held-out data)")
    return DataConfig(**{**data, "path": path, "val_fraction": 0.0, "split": "train", "sources": []}), note
