"""`hylo plan`: the per-rank memory of a run, before anything is allocated, and what would make it fit — on GPUs,
or (`--cpu`) on the CPU's host memory, which `hylo train` also checks before it allocates a CPU run.

The model counts bytes the way the run will hold them on a GPU (bf16 autocast over fp32 weights, the fused
Triton/SDPA kernels):

  weights, gradients, optimizer   fp32 weights and gradients, AdamW's two fp32 moments; FSDP2 (parallel.dp_shard)
                                  shards all three over the data-parallel ranks and gathers two blocks' weights at a
                                  time; DeepSpeed ZeRO shards the moments (stage 1), the gradients (2), the weights (3)
  activations                     what each block keeps for backward, per token, from what its layers save
                                  (`Mixer.saved_per_token`, the norms and the MLP below) under the checkpointing
                                  policy, the MLP tile and offload; times the rank's tokens (micro-batch x seq_len / cp)
  recompute                       checkpointing recomputes one block at a time in backward: one block's tensors
  logits                          the loss: the full logits (kept as fp32 log-probabilities, with their gradient
                                  and the bf16 logits alive at the peak), or one chunk's worth with train.loss_chunk
  context parallelism             ring: the neighbours' key/value blocks in flight; Ulysses: the all-to-all copies
                                  of one layer's q, k, v and output
  teacher                         train.objective=align|distill: the frozen teacher's weights (bf16 where the run
                                  is; its blocks sharded where the student's are, embedding and head whole), one of
                                  its blocks' transients at a time (no_grad), what it hands the objective (its final
                                  hidden states, or each aligned block's input and attention output) and its share
                                  of a KL chunk's logits
  runtime                         the CUDA context and allocator fragmentation (a fixed 1 GiB + 5%)

The activation model is checked against the bytes autograd really keeps (tests/test_memory.py, every layer type,
two lengths, within 15%); the GPU check compares the whole plan with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hylo.models.layers import ffn_width
from hylo.models.lm import MIXERS, HybridLM, layer_types
from hylo.models.mixer import Saved
from hylo.parallel.layout import cp_degree_ulysses
from hylo.trainer.config import Config, ConfigError, check_batch_layout, load_config

GiB = 1024**3
RUNTIME_FIXED = 1.0 * GiB  # the CUDA context, or on the CPU the process itself (torch, Python, the data stack)
FRAGMENTATION = 0.05


def host_memory_gib() -> float:
    """Memory this process may still take on its host: MemAvailable, or less under a cgroup limit."""
    available = float("inf")
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # cgroup v2: the container's limit less what it already uses
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available / GiB if available != float("inf") else 0.0


def norm_saved(model_cfg, act: int, compute: int, what: str) -> list[Saved]:
    """A pre-norm in front of a projection: x * rstd and its statistics in fp32, the normed output (which the
    projection keeps), and its bf16 copy under autocast."""
    d = model_cfg.d_model
    saved = [Saved(f"{what}: statistics", compute), Saved(f"{what}: x * rstd", d * compute)]
    if model_cfg.norm == "rms":
        saved.append(Saved(f"{what}: output", d * compute))
    if act != compute:
        saved.append(Saved(f"{what}: output cast for the projection", d * act))
    return saved


def mlp_saved(model_cfg, act: int) -> list[Saved]:
    f = ffn_width(model_cfg)
    if model_cfg.mlp == "swiglu":
        return [Saved("MLP: gate and up projection", 2 * f * act), Saved("MLP: silu(gate)", f * act),
                Saved("MLP: silu(gate) * up", f * act)]
    if model_cfg.mlp == "sglu":
        return [Saved("MLP: both projections", 2 * f * act), Saved("MLP: product", f * act)]
    return [Saved("MLP: up projection", f * act), Saved("MLP: gelu(up)", f * act)]


def block_saved(layer_type: str, model_cfg, policy: str, mlp_tile: int, act: int, compute: int) -> list[Saved]:
    """What one block keeps per token until its backward, under checkpointing `policy`."""
    d = model_cfg.d_model
    kept = [Saved("block input (residual stream)", d * compute)]
    mixer = MIXERS[layer_type].saved_per_token(model_cfg, act, compute)
    if policy == "full":
        return kept
    if policy == "selective":
        return kept + [s for s in mixer if s.op_output]
    kept += norm_saved(model_cfg, act, compute, "mixer norm") + mixer
    kept += [Saved("residual after the mixer", d * compute)] + norm_saved(model_cfg, act, compute, "MLP norm")
    if not mlp_tile:
        kept += mlp_saved(model_cfg, act)
    return kept


def per_token(saved: list[Saved]) -> float:
    return sum(s.bytes for s in saved)


@dataclass
class Plan:
    lines: list[tuple[str, float, str]]  # (component, bytes, how it was counted)
    gpu_bytes: float

    @property
    def total(self) -> float:
        return sum(b for _, b, _ in self.lines)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes


def _parameter_counts(cfg: Config) -> tuple[int, int]:
    """(all parameters, the largest block's), counted on the meta device."""
    with torch.device("meta"):
        model = HybridLM(cfg.model)
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    return model.num_params(), block


class RetainedBytes(TorchDispatchMode):
    """Measures what a forward leaves alive for backward: every storage an op creates inside the context is
    tracked (weakly); `retained()` sums those still alive, so saved tensors, checkpoint inputs and selective
    checkpointing's cache all count, whatever keeps them.  Storages named in `exclude` (weights, inputs, the
    output itself) are left out.  CPU or GPU; this is how the activation model is validated."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                known = self.storages.get(id(storage))
                if known is None or known[0]() is not storage:  # (an id can be reused once a storage is freed)
                    self.storages[id(storage)] = (weakref.ref(storage), storage.nbytes())
        return out

    def retained(self, exclude: tuple[torch.Tensor, ...] = ()) -> int:
        gc.collect()
        skip = {t.untyped_storage().data_ptr() for t in exclude}
        return sum(n for ref, n in self.storages.values()
                   if (s := ref()) is not None and s.data_ptr() not in skip)


def choose_checkpointing(cfg: Config, gpus: int, gpu_mem_gib: float, device: str = "cuda") -> tuple[str, str]:
    """train.activation_checkpointing=auto: the cheapest policy whose plan fits (none, then selective — which keeps
    every mixer op's output and recomputes the rest — then full), and a line saying why.  Selective is skipped
    under train.compile=on (it does not compile); full is the answer when none fits (the plan then says so)."""
    policies = ["none", "full"] if cfg.train.compile == "on" else ["none", "selective", "full"]
    for policy in policies:
        plan = plan_memory(_with(cfg, train__activation_checkpointing=policy), gpus, gpu_mem_gib, device)
        if plan.fits or policy == "full":
            where = f"{gpu_mem_gib:.1f} GiB per {'GPU' if device == 'cuda' else 'rank of host memory'}"
            verdict = "fits" if plan.fits else "is the most it can do, and does not fit"
            return policy, (f"train.activation_checkpointing=auto: {policy} ({plan.total / GiB:.1f} GiB planned "
                            f"per rank {verdict} in {where})")
    raise AssertionError("unreachable")


def plan_memory(cfg: Config, gpus: int, gpu_mem_gib: float, device: str = "cuda") -> Plan:
    """Per-rank bytes of a run of `cfg` on `gpus` GPUs of `gpu_mem_gib` GiB each, or (device "cpu") on `gpus` CPU
    ranks sharing `gpu_mem_gib` GiB of host memory each (fp32 unless train.dtype=bf16, no CUDA context)."""
    if cfg.train.activation_checkpointing == "auto":
        cfg = _with(cfg, train__activation_checkpointing=choose_checkpointing(cfg, gpus, gpu_mem_gib, device)[0])
    m, t, p = cfg.model, cfg.train, cfg.parallel
    if gpus % p.cp:
        raise ConfigError(f"--gpus {gpus} is not a multiple of parallel.cp={p.cp}")
    dp = gpus // p.cp
    micro, micro_steps = check_batch_layout(cfg, dp)
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and device == "cuda")
    act, compute = (2 if bf16 else 4), 4
    tokens = micro * t.seq_len / p.cp  # this rank's tokens in one forward
    n_params, block_params = _parameter_counts(cfg)
    lines: list[tuple[str, float, str]] = []

    # weights, gradients, optimizer state
    shard_w = shard_g = shard_o = 1
    if t.engine == "deepspeed":
        stage = cfg.deepspeed.zero_stage
        shard_o, shard_g, shard_w = (dp if stage >= 1 else 1), (dp if stage >= 2 else 1), (dp if stage >= 3 else 1)
        how = f"ZeRO stage {stage} over {dp} data-parallel ranks"
    elif p.dp_shard and dp > 1:
        shard_w = shard_g = shard_o = dp
        how = f"FSDP2 over {dp} data-parallel ranks"
    else:
        how = "replicated" + (f" (DDP over {dp} ranks)" if dp > 1 else "")
    lines.append(("weights (fp32)", 4 * n_params / shard_w, how))
    lines.append(("gradients (fp32)", 4 * n_params / shard_g, how))
    lines.append(("AdamW moments (2 x fp32)", 8 * n_params / shard_o, how))
    if shard_w > 1:
        lines.append(("gathered weights", 2 * 4 * block_params, "two blocks unsharded at a time"))
    if bf16 and t.activation_checkpointing == "none":
        lines.append(("bf16 weight copies", 2 * (n_params - m.vocab_size * m.d_model), "autocast keeps them for "
                                                                                        "backward"))

    # activations
    offload = t.activation_offload
    kinds = layer_types(m)
    body = sum(per_token(block_saved(k, m, t.activation_checkpointing, m.mlp_tile, act, compute)) for k in kinds)
    head = m.d_model * compute + per_token(norm_saved(m, act, compute, "final norm"))
    label = f"{len(kinds)} blocks, {t.activation_checkpointing} checkpointing"
    label += f", MLP tiles of {m.mlp_tile}" if m.mlp_tile else ""
    if offload:
        lines.append(("activations", 0.0, f"{label}: {tokens * (body + head) / GiB:.2f} GiB offloaded to host "
                                          "memory (one block's worth in flight, below)"))
        lines.append(("offload in flight", tokens * max(body / len(kinds), head) * 2, "two blocks' tensors"))
    else:
        lines.append(("activations", tokens * (body + head), f"{label}; {tokens:,.0f} tokens per rank"))
    if t.activation_checkpointing != "none":
        worst = max(per_token(block_saved(k, m, "none", m.mlp_tile, act, compute)) for k in set(kinds))
        lines.append(("recompute", tokens * worst, "one block's tensors rebuilt in backward"))
    tile = min(m.mlp_tile or tokens, tokens)
    lines.append(("MLP hidden in backward", tile * 3 * ffn_width(m) * act, "the widest transient of a block's "
                                                                            "backward"))

    # logits and loss
    v = m.vocab_size
    chunked = 0 < t.loss_chunk < micro * t.seq_len / p.cp
    if chunked:
        lines.append(("logits", t.loss_chunk * v * (act + 2 * compute) + tokens * (compute + 8),
                      f"one chunk of {t.loss_chunk} tokens (train.loss_chunk) + per-token lse"))
    else:
        lines.append(("logits", tokens * v * (act + 2 * compute), f"full logits: {'bf16' if bf16 else 'fp32'}, "
                                                                   "fp32 log-probabilities kept for backward and "
                                                                   "their gradient"))

    # context parallelism
    if p.cp > 1:
        h, kv = m.n_heads, m.n_kv_heads or m.n_heads
        hd = m.head_dim or m.d_model // h
        u = cp_degree_ulysses(p.cp, p.cp_mode, p.ulysses)
        ring = p.cp // u
        buffers = 0.0
        if ring > 1:
            buffers += 2 * 2 * tokens * kv * hd * act  # double-buffered k and v of a neighbour's segment
        if u > 1:
            buffers += 2 * tokens * (2 * h + 2 * kv) * hd * act  # send and receive copies of q, k, v, out
        lines.append(("context-parallel buffers", buffers, f"cp={p.cp} ({p.cp_mode}: ring {ring} x Ulysses {u}), "
                                                           "one layer at a time"))

    if cfg.train.objective != "lm":
        lines.extend(teacher_lines(cfg, dp, tokens, act, bf16, shard_w > 1))

    # Gradients on one rank without DDP, one micro-batch per step: set to None after every optimizer step, they are
    # made block by block in backward while the blocks' activations are freed, so the peak is the larger of
    # (activations + the first blocks' gradients) early in backward and (all gradients) at the optimizer step.
    # DDP keeps a bucket copy of every gradient, and accumulation keeps them across micro-batches: all counted.
    if t.engine == "torch" and dp == 1 and micro_steps == 1 and device == "cuda":
        early = 4 * (m.vocab_size * m.d_model + block_params)  # the head's (tied embedding) and the last block's
        dynamic = sum(b for name, b, _ in lines if name not in ("weights (fp32)", "gradients (fp32)",
                                                                 "AdamW moments (2 x fp32)"))
        full = 4 * n_params
        at_peak = max(early, full - dynamic)
        lines[1] = ("gradients (fp32)", at_peak, f"{at_peak / GiB:.2f} of {full / GiB:.2f} GiB alive at the peak "
                                                 "(made block by block in backward as activations are freed)")
    gpu = gpu_mem_gib * GiB
    lines.append(("runtime", RUNTIME_FIXED + FRAGMENTATION * sum(b for _, b, _ in lines),
                  "CUDA context + 5% allocator fragmentation" if device == "cuda" else
                  "the process (torch, Python, data) + 5% allocator slack"))
    return Plan(lines, gpu)


@functools.lru_cache(maxsize=8)
def _teacher_shape(path: str):
    """(teacher model config, its parameters, its largest block's, its embedding + head's) without its weights."""
    from hylo.trainer.distillation.teacher import teacher_model_config

    teacher_cfg = teacher_model_config(path)
    with torch.device("meta"):
        model = HybridLM(teacher_cfg)
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    whole = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("blocks."))
    return teacher_cfg, model.num_params(), block, whole


def teacher_lines(cfg: Config, dp: int, tokens: float, act: int, bf16: bool,
                  sharded: bool) -> list[tuple[str, float, str]]:
    """The frozen teacher's share of a rank's memory (module docstring)."""
    t_cfg, n_params, block, whole = _teacher_shape(cfg.distill.teacher)
    width = 2 if bf16 else 4
    blocks = n_params - whole
    lines = [("teacher weights", width * (whole + blocks / (dp if sharded else 1)),
              f"{n_params / 1e6:.1f}M parameters in {'bf16' if bf16 else 'fp32'}, "
              + (f"blocks sharded over {dp} ranks, embedding and head whole" if sharded else "whole on every rank"))]
    if sharded:
        lines.append(("teacher gathered block", width * block, "one block unsharded at a time (no_grad forward)"))
    transient = tokens * (3 * ffn_width(t_cfg) + 4 * t_cfg.d_model) * act
    if cfg.train.objective == "align":
        kept = 2 * len(cfg.distill.align_layers or layer_types(cfg.model)) * tokens * t_cfg.d_model * act
        handed = "each aligned block's input and attention output (every block, unless distill.align_layers)"
    else:
        chunk = min(cfg.train.loss_chunk or tokens, tokens)
        kept = tokens * t_cfg.d_model * act + chunk * t_cfg.vocab_size * (act + 2 * 4)
        handed = f"its final hidden states and one KL chunk's logits ({chunk:,.0f} tokens)"
    lines.append(("teacher activations", transient + kept, f"one block's transients at a time; {handed}"))
    return lines


def _with(cfg: Config, **changes) -> Config:
    out = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train), model=dataclasses.replace(cfg.model),
                              parallel=dataclasses.replace(cfg.parallel))
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(out, section), name, value)
    return out


def suggest(cfg: Config, gpus: int, gpu_mem_gib: float, device: str = "cuda") -> tuple[list[str], Plan] | None:
    """Settings added cheapest first (in compute and communication) until the run fits: (the overrides, the
    plan with them), or None.  One sequence per micro-batch comes first (the global batch stays)."""
    steps: list[dict] = []
    micro, _ = check_batch_layout(cfg, max(1, gpus // cfg.parallel.cp))
    if micro > 1:  # gradient accumulation keeps the global batch and costs no extra compute: the cheapest step
        steps.append({"train__micro_batch_size": 1})
    if cfg.train.loss_chunk == 0:
        steps.append({"train__loss_chunk": 4096})
    if cfg.train.activation_checkpointing == "auto":  # its choice did not fit: say what does, by name
        cfg = _with(cfg, train__activation_checkpointing="none")
    if cfg.train.activation_checkpointing == "none":
        steps.append({"train__activation_checkpointing": "selective"})
    if not cfg.model.mlp_tile:
        steps.append({"model__mlp_tile": 4096})
    if cfg.train.activation_checkpointing != "full":
        steps.append({"train__activation_checkpointing": "full"})
    cp = cfg.parallel.cp
    while cp * 2 <= gpus and gpus % (cp * 2) == 0 and cfg.train.seq_len % (cp * 2) == 0:
        cp *= 2
        steps.append({"parallel__cp": cp})
    if not cfg.train.activation_offload and device == "cuda":  # (on the CPU activations are in host memory)
        steps.append({"train__activation_offload": True})
    changes: dict = {}
    for change in steps:
        changes.update(change)
        candidate = plan_memory(_with(cfg, **changes), gpus, gpu_mem_gib, device)
        if candidate.fits:
            overrides = [f"{key.replace('__', '.')}={str(value).lower() if isinstance(value, bool) else value}"
                         for key, value in changes.items()]
            return overrides, candidate
    return None


def render(plan: Plan) -> str:
    width = max(len(name) for name, _, _ in plan.lines)
    rows = [f"  {name:<{width}}  {b / GiB:8.2f} GiB   {how}" for name, b, how in plan.lines]
    verdict = "fits" if plan.fits else "does NOT fit"
    rows.append(f"  {'total':<{width}}  {plan.total / GiB:8.2f} GiB   of {plan.gpu_bytes / GiB:.1f} GiB: {verdict}")
    return "\n".join(rows)


def run(args) -> int:
    """`hylo plan` (arguments: trainer/arguments.py)."""
    device = "cpu" if args.cpu else "cuda"
    if args.gpu_mem is None:  # the CPU's own host memory, shared by its ranks; a GPU's 80 GiB
        args.gpu_mem = host_memory_gib() / args.gpus if args.cpu else 80.0
    if args.gpus < 1 or args.gpu_mem <= 0:
        raise ConfigError("--gpus must be >= 1 and --gpu-mem positive")
    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size == 0:
        from hylo.trainer.data.tokenizer import load_tokenizer

        cfg.model.vocab_size = 64 * -(-load_tokenizer(cfg.data.tokenizer).get_vocab_size() // 64)
    plan = plan_memory(cfg, args.gpus, args.gpu_mem, device)
    t = cfg.train
    where = (f"{args.gpus} CPU rank(s) with {args.gpu_mem:.1f} GiB of host memory each" if args.cpu
             else f"{args.gpus} GPU(s) of {args.gpu_mem:g} GiB")
    print(f"[hylo] plan: {cfg.model.n_layers} layers {cfg.model.pattern}, d_model {cfg.model.d_model}, "
          f"seq_len {t.seq_len:,}, {where}, per rank:")
    print(render(plan))
    if plan.fits:
        return 0
    found = suggest(cfg, args.gpus, args.gpu_mem, device)
    if found is None:
        print(f"[hylo] no combination of loss chunking, checkpointing, MLP tiles, context parallelism over the "
              f"{args.gpus} rank(s){'' if args.cpu else ' and offload'} fits; use more "
              f"{'memory' if args.cpu else 'GPUs (--gpus)'}, a smaller model or a shorter train.seq_len")
        return 1
    changes, fitted = found
    print(f"[hylo] it fits with {' '.join(changes)}: {fitted.total / GiB:.2f} GiB per rank")
    return 1


def check_host_memory(cfg: Config, ranks_here: int, world: int) -> None:
    """Refuse a CPU run that cannot fit in this host's memory, with the plan's numbers and what would fit, before
    anything is allocated (an allocation failure is a 50-line traceback, or the kernel's OOM killer)."""
    available = host_memory_gib()
    if available <= 0:
        return  # nothing to compare with
    per_rank = available / ranks_here
    plan = plan_memory(cfg, world, per_rank, "cpu")
    if plan.fits:
        return
    found = suggest(cfg, world, per_rank, "cpu")
    hint = (f"It fits with {' '.join(found[0])} ({found[1].total / GiB:.1f} GiB)." if found else
            "No checkpointing, tiling or loss chunking makes it fit: use a smaller model, a shorter "
            "train.seq_len or a smaller train.batch_size.")
    raise ConfigError(f"this CPU run needs about {plan.total / GiB:.1f} GiB per rank by hylo plan's model (weights, "
                      f"gradients and AdamW moments alone {sum(b for _, b, _ in plan.lines[:3]) / GiB:.1f} GiB), "
                      f"and {per_rank:.1f} GiB of host memory is free{' per rank' if ranks_here > 1 else ''}. "
                      f"{hint} (`hylo plan --cpu ...` shows the whole plan; train.check_memory=false tries anyway)")
