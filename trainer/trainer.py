"""The Trainer: builds a run from its config, then loops  next batch -> engine.train_step -> callbacks.

What the loop owns is only its counters (`state_dict`); the engine owns the step (trainer/engines/), the
callbacks own everything optional and decide their own timing (trainer/callbacks/), and parallelism is applied to
the plain model from outside (parallel/).  Nothing in the loop waits for the device: the non-finite check reads a
device flag at logging steps and before saves and evaluations (`check_finite`).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hylo.kernels.ops import set_backward_dq
from hylo.models.lm import HybridLM
from hylo.parallel.activation_checkpointing import apply_activation_checkpointing
from hylo.parallel.dims import ParallelDims
from hylo.parallel.strategies import apply_context_parallel, cp_config_problem, make_context
from hylo.trainer.callbacks import Callback, Callbacks, default_callbacks
from hylo.trainer.checkpointing import latest_checkpoint, read_trainer_state, recover_leftovers, verified_checkpoint
from hylo.trainer.checkpointing.export import load_weights
from hylo.trainer.checkpointing.hf_import import apply_shape, import_into, is_hf_folder, read_hf_config
from hylo.trainer.checkpointing.resume import (
    apply_optimiser_settings,
    check_config_source,
    config_record,
    resume_changes,
)
from hylo.trainer.checkpointing.step_folder import barrier, foreign_checkpoints, lineage_of
from hylo.trainer.checkpointing.transfer import (
    load_source_model,
    needs_transfer,
    resolve_source,
    source_model_config,
    take_shape,
    transfer,
)
from hylo.trainer.config import Config, check_batch_layout, compile_choice, to_yaml
from hylo.trainer.data.documents import document_masking
from hylo.trainer.data.loader import DataLoader
from hylo.trainer.data.mqar import MQARLoader, mqar_spec
from hylo.trainer.data.provenance import check_source, data_provenance
from hylo.trainer.data.tokenizer import load_tokenizer
from hylo.trainer.distillation.objectives import AlignObjective, DistillObjective
from hylo.trainer.distillation.teacher import (
    align_layers,
    check_same_teacher,
    check_student,
    load_teacher,
    prepare_teacher,
)
from hylo.trainer.engines import StepResult, build_engine, engine_problem, use_bf16
from hylo.trainer.engines.optim import build_scheduler
from hylo.trainer.errors import ConfigError, HyloError, TrainingDiverged
from hylo.trainer.run_log import MetricsLogger
from hylo.trainer.runtime.distributed import DistInfo
from hylo.trainer.runtime.run_lock import RunDirLocked, RunLock


def run_problem(cfg: Config, world: int, device: torch.device | None = None) -> str | None:
    """Why this config cannot run on `world` ranks of `device` (parallel layout, layer types, engine), or None —
    before any work starts."""
    if cfg.train.activation_offload and device is not None and device.type == "cpu":
        return ("train.activation_offload=true moves saved activations from the GPU to host memory, but this run is "
                "on the CPU, where they already are; drop train.activation_offload (to save memory on a CPU, use "
                "train.activation_checkpointing=full or model.mlp_tile)")
    return cp_config_problem(cfg, world, sorted(set(cfg.model.pattern))) or engine_problem(cfg)


def resume_path(cfg: Config, ckpt_dir: Path) -> Path | None:
    resume = cfg.checkpoint.resume
    if resume == "auto":
        return latest_checkpoint(ckpt_dir)
    if resume == "none":
        if latest_checkpoint(ckpt_dir) is not None and not cfg.checkpoint.overwrite:
            raise ConfigError(
                f"checkpoint.resume=none but {ckpt_dir} already holds checkpoints that this run would overwrite; "
                "use a new run.dir, checkpoint.resume=auto to continue, or checkpoint.overwrite=true to move them "
                "aside"
            )
        return None
    return Path(resume)


def remove_if_empty(folder: Path) -> None:
    """Remove `folder` if it holds no files (empty subfolders at most)."""
    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, callbacks: Sequence[Callback] = (),
                 config_from: Path | None = None):
        problem = run_problem(cfg, info.world, info.device)
        if problem:
            raise ConfigError(problem)
        self.cfg, self.device, self.is_main = cfg, info.device, info.is_main
        self.teacher = load_teacher(cfg.distill.teacher) if cfg.train.objective != "lm" else None
        if self.teacher is not None:
            # a run dir resolved to its newest step (said by the resolver): the config records that step, so a
            # resume reads the same teacher however far the teacher's own run has gone on since
            cfg.distill.teacher = str(self.teacher.path)
            if cfg.model.vocab_size == 0 and not cfg.model.init_from:
                cfg.model.vocab_size = self.teacher.cfg.vocab_size
        # model.init_from: a hylo source is mapped block by block (its shape taken now, its weights read when the
        # run starts from it rather than resumes), a Hugging Face folder imported
        self.transfer_from = None
        if cfg.model.init_from and needs_transfer(cfg.model.init_from, cfg.model.pattern, cfg.model.n_layers):
            self.transfer_from = resolve_source(cfg.model.init_from, "model.init_from")
            take_shape(cfg.model, source_model_config(self.transfer_from), f"model.init_from={cfg.model.init_from}")
        elif is_hf_folder(cfg.model.init_from):  # model.init_from=HF_DIR: the shape is the Hugging Face model's
            apply_shape(cfg.model, read_hf_config(Path(cfg.model.init_from)), given=set())
        if self.teacher is not None:
            check_student(cfg, self.teacher)  # before anything is built or written
        self.config_from = config_from  # the checkpoint whose trainer state `cfg` was read from, if any
        self.dims = ParallelDims.build(info.world, info.rank, cfg.parallel.cp, info.device)
        micro, accum = check_batch_layout(cfg, self.dims.dp)  # accumulation steps = the loader batch's first dim
        torch.manual_seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        set_backward_dq(cfg.train.attention_dq)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = 64 * -(-self.tokenizer.get_vocab_size() // 64)
        elif cfg.model.vocab_size < self.tokenizer.get_vocab_size() and cfg.data.format != "mqar":  # ids, not text
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} < the tokenizer's "
                              f"{self.tokenizer.get_vocab_size()}")
        # The policy this run applies; the config (saved with every checkpoint) keeps `auto`, so a resume decides
        # again for its own device and length.
        self.checkpointing = cfg.train.activation_checkpointing
        if self.checkpointing == "auto":
            self.checkpointing = self._choose_checkpointing(info.world)
        if self.device.type == "cpu" and cfg.train.check_memory:  # before anything large is allocated
            from hylo.trainer.memory_plan import check_host_memory

            check_host_memory(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), info.world)
        self.loader = self._build_loader(micro)
        if isinstance(self.loader, DataLoader):
            self.loader.check_readable()  # bad data fails here, before the run dir is touched
        if cfg.data.val_fraction and self.is_main:
            print(f"[hylo] data.val_fraction={cfg.data.val_fraction}: documents whose text hashes under that fraction "
                  "are held out for validation, the same on every rank and epoch (counted when the first epoch ends)",
                  flush=True)
        self.data_source = data_provenance(cfg.data, self.tokenizer)
        self.documents = document_masking(cfg, self.tokenizer)  # None unless data.document_masking
        self.lock = RunLock(self.run_dir)
        new_run_dir = not self.run_dir.exists()
        try:
            self._lock_run_dir()
            self._build(info, micro, accum, callbacks)
        except BaseException:
            self.lock.release()
            self.loader.close()
            if new_run_dir and self.is_main:  # a refused start leaves no empty run dir behind
                remove_if_empty(self.run_dir)
            raise

    def _choose_checkpointing(self, world: int) -> str:
        """train.activation_checkpointing=auto: the cheapest policy hylo plan fits in this device's memory (the
        GPU's, or this rank's share of the host's); said when it is not `none`."""
        from hylo.trainer.memory_plan import GiB, choose_checkpointing, host_memory_gib

        if self.device.type == "cuda":
            memory = torch.cuda.get_device_properties(self.device).total_memory / GiB
        else:
            memory = host_memory_gib() / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            if memory <= 0:
                return "none"  # nothing to compare with
        policy, why = choose_checkpointing(self.cfg, world, memory, self.device.type)
        if policy != "none" and self.is_main:
            print(f"[hylo] {why}", flush=True)
        return policy

    def _lock_run_dir(self) -> None:
        """Rank 0 takes the run dir's lock; every rank learns the outcome (and raises together if refused)."""
        outcome = [None, None]  # (refusal, note)
        if self.is_main:
            try:
                outcome[1] = self.lock.acquire()
            except RunDirLocked as err:
                outcome[0] = str(err)
        if dist.is_initialized():
            dist.broadcast_object_list(outcome, src=0)
        if outcome[0]:
            raise ConfigError(outcome[0])
        if outcome[1] and self.is_main:
            print(outcome[1], flush=True)

    def _build(self, info: DistInfo, micro: int, accum: int, callbacks: Sequence[Callback]) -> None:
        cfg = self.cfg
        recover_leftovers(self.ckpt_dir)  # what a crash mid-save or mid-prune left, before choosing a checkpoint
        barrier()
        self.resume_from = resume_path(cfg, self.ckpt_dir)
        if cfg.checkpoint.resume != "none":  # the newest that verifies (auto), or the named one if it verifies
            self.resume_from = verified_checkpoint(
                self.ckpt_dir, None if cfg.checkpoint.resume == "auto" else self.resume_from,
                verify=cfg.checkpoint.checksums)
        if self.resume_from is not None:  # another engine's checkpoint: refused before any slow build
            read_trainer_state(self.resume_from, expect_engine=cfg.train.engine)
        # One run's steps, through any number of resumes, share a lineage id, recorded in every checkpoint
        self.lineage = (lineage_of(self.resume_from) if self.resume_from else None) or uuid.uuid4().hex
        self._claim_run_dir()

        model = HybridLM(cfg.model).to(self.device)
        if cfg.model.init_from and self.resume_from is None:
            if self.transfer_from is not None:  # the teacher's weights in memory already, when it is the source
                same = self.teacher is not None and self.teacher.path.resolve() == self.transfer_from.resolve()
                source = self.teacher.model if same else load_source_model(self.transfer_from, "model.init_from")[0]
                note = transfer(source, model, f"model.init_from={cfg.model.init_from}")
                if self.is_main:
                    print(f"[hylo] model.init_from={cfg.model.init_from}: {note}", flush=True)
            elif is_hf_folder(cfg.model.init_from):
                note = import_into(model, Path(cfg.model.init_from))
                if self.is_main:
                    print(f"[hylo] model.init_from={cfg.model.init_from}: {note}", flush=True)
            else:
                load_weights(model, cfg.model.init_from)
        self.positions = None  # global positions of this rank's tokens under context parallelism
        cp = None
        if self.dims.cp > 1:
            cp = make_context(self.dims.mesh, cfg.train.seq_len, cfg.parallel.cp_mode, cfg.parallel.ulysses)
            apply_context_parallel(model, cp)
            self.positions = cp.positions(self.device)
        self.flops_per_token = model.flops_per_token(cfg.train.seq_len)
        self.n_params = model.num_params()
        self.objective = self._build_objective(model, cp, info.world)
        apply_activation_checkpointing(model, self.checkpointing)
        self.compiled, why_eager = compile_choice(cfg, self.device.type, self.checkpointing)
        if why_eager and self.is_main:
            print(f"[hylo] {why_eager}", flush=True)
        if self.compiled:
            if self.device.type == "cuda":  # attention's flash backend is probed eagerly, not while tracing
                from hylo.kernels.attention import say_flash_problem
                from hylo.kernels.attention.flash import probe_flash

                if problem := probe_flash(self.device):
                    say_flash_problem(problem)
            # One graph per block: a graph break is a bug, so it fails (auto: falls back) loudly — except with
            # packed documents, whose boundaries the ops read on the host (per-document launches, checks)
            for block in model.blocks:
                block.compile(fullgraph=not cfg.data.document_masking)
        # `auto` may fall back to eager blocks if compiling fails at the first step (torch engine: nothing of a
        # failed first step reaches the weights; DeepSpeed's partitioned gradients are not retried)
        self.compile_fallback = self.compiled and cfg.train.compile == "auto" and cfg.train.engine == "torch"
        self.blocks = list(model.blocks)
        self.engine = build_engine(model, cfg, info.world, micro, accum, self.device)  # DP, optimizer, step
        self.model = self.engine.model
        self.scheduler = build_scheduler(self.engine.optimizer, cfg)
        self.checkpointer = self.engine.checkpointer(self.ckpt_dir)
        self.callbacks = Callbacks([*default_callbacks(cfg), *callbacks])

        # The loop's counters: all a resumed run needs besides the components' own states.
        self.step = self.start_step = 0
        self.skipped_steps = 0
        self.stop_reason: str | None = None
        self.step_started = 0.0
        self.summary: dict[str, Any] = {}
        self.say = print if self.is_main else (lambda *args, **kwargs: None)  # what every rank knows: said once
        self._first_bad_step = torch.zeros((), dtype=torch.long, device=self.device)  # 0: every step finite
        if self.resume_from is not None:
            saved = read_trainer_state(self.resume_from)  # checked before the weights are read
            check_config_source(self.config_from, self.resume_from, saved)
            changed, model_changes = resume_changes(saved.get("config"), cfg, str(self.resume_from))
            if self.teacher is not None and (moved := check_same_teacher(saved.get("distill_teacher"), self.teacher,
                                                                         self.resume_from)) and self.is_main:
                print(moved, flush=True)
            note = check_source(saved.get("data_source"), self.data_source, str(self.resume_from),
                                cfg.data.allow_source_change)
            if note and self.is_main:
                print(note, flush=True)
            self.load_checkpoint_state(self.engine.load(self.resume_from))
            apply_optimiser_settings(self.engine.optimizer, self.scheduler, cfg)
            if changed and self.is_main:
                print(f"[hylo] resuming with this run's settings where they differ from the checkpoint's: "
                      f"{', '.join(changed)}", flush=True)
            if model_changes and self.is_main:
                print(f"[hylo] note: resuming with model settings that change what the model computes (the weights "
                      f"fit; the function they compute differs): {', '.join(model_changes)}", flush=True)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main, start_step=self.start_step)

    def _build_objective(self, model: HybridLM, cp, world: int):
        """train.objective=align|distill: the teacher laid out as the student (dtype, context parallelism,
        sharding) and the objective the engine calls per micro-batch; align freezes all but the aligned mixers.
        None for the next-token loss."""
        cfg, teacher = self.cfg, self.teacher
        if teacher is None:
            return None
        sharded = world > 1 and (cfg.parallel.dp_shard or (cfg.train.engine == "deepspeed"
                                                             and cfg.deepspeed.zero_stage == 3))
        dtype = torch.bfloat16 if use_bf16(cfg, self.device) else torch.float32
        prepare_teacher(teacher, self.device, dtype, cp, shard=sharded)
        self.flops_per_token += teacher.model.flops_per_token(cfg.train.seq_len) / 3  # its forward
        if cfg.train.objective == "distill":
            what = f"distill (KL at temperature {cfg.distill.temperature}" + (
                f" + {cfg.distill.lm_weight} x next-token loss)" if cfg.distill.lm_weight else ")")
            objective = DistillObjective(teacher, cfg.distill.temperature, cfg.distill.lm_weight,
                                         cfg.train.loss_chunk)
        else:
            layers = align_layers(cfg, teacher)
            model.requires_grad_(False)
            for i in layers:
                model.blocks[i].mixer.requires_grad_(True)
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            what = f"align blocks {layers} (their mixers train: {trained / 1e6:.2f}M parameters; the rest frozen)"
            objective = AlignObjective(teacher, layers)
        if self.is_main:
            print(f"[hylo] train.objective={cfg.train.objective}: {what}; teacher {teacher.path} "
                  f"({teacher.model.num_params() / 1e6:.2f}M parameters, layers {teacher.identity['layers']}, "
                  f"fingerprint {teacher.identity['fingerprint']}){', blocks sharded' if sharded else ''}",
                  flush=True)
        return objective

    def _claim_run_dir(self) -> None:
        """The run dir holds one lineage's checkpoints: another run's are refused by name, or moved aside (with
        their metrics and TensorBoard logs) when checkpoint.overwrite=true, never written over step by step."""
        foreign = foreign_checkpoints(self.ckpt_dir, self.lineage, self.resume_from)
        if not foreign:
            return
        listed = ", ".join(path.name for path, _ in foreign[:4]) + (f" and {len(foreign) - 4} more"
                                                                     if len(foreign) > 4 else "")
        lineages = ", ".join(sorted({lineage for _, lineage in foreign}))
        this = f"continues the run of {self.resume_from}" if self.resume_from else "is a new run"
        if not self.cfg.checkpoint.overwrite:
            raise ConfigError(f"run.dir={self.run_dir} holds another run's checkpoints ({listed}; lineage "
                              f"{lineages}), and this run {this}: its saves and metrics would mix with them. Give "
                              f"this run its own run.dir, or checkpoint.overwrite=true to move them aside (to "
                              f"{self.run_dir / 'superseded'}/)")
        if self.is_main:
            aside = self.run_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
            (aside / "checkpoints").mkdir(parents=True, exist_ok=True)
            for path, _ in foreign:
                path.rename(aside / "checkpoints" / path.name)
            for name in ("metrics.jsonl", "tb"):
                if (self.run_dir / name).exists():
                    (self.run_dir / name).rename(aside / name)
            print(f"[hylo] checkpoint.overwrite=true: moved another run's checkpoints ({listed}; lineage "
                  f"{lineages}) and its logs aside to {aside}", flush=True)
        barrier()

    def _build_loader(self, micro: int):
        cfg, dims = self.cfg, self.dims
        if cfg.data.format == "mqar":
            return MQARLoader(mqar_spec(cfg), cfg.train.batch_size, micro, dims.dp_rank, dims.dp, cfg.train.seed)
        return DataLoader(cfg.data, self.tokenizer, seq_len=cfg.train.seq_len, global_batch=cfg.train.batch_size,
                          micro_batch=micro, rank=dims.dp_rank, world=dims.dp, seed=cfg.train.seed)

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to train.steps (or until a callback asks to stop); returns a summary of the run."""
        self._announce()
        summary = {"first_loss": None, "last_loss": None, "run_dir": str(self.run_dir), "start_step": self.start_step}
        if self.start_step >= self.cfg.train.steps:  # already complete (said): no bar, nothing saved
            self.close(done=False)
            return summary
        self.model.train()
        try:
            self.callbacks.on_train_start(self)
            while self.step < self.cfg.train.steps and self.stop_reason is None:
                self.step_started = time.perf_counter()
                self.step += 1
                self.callbacks.on_step_start(self)
                batch = next(self.loader).to(self.device, non_blocking=True).long()
                result = self._train_step(batch)
                self.scheduler.step()
                self._account(result)
                self.callbacks.on_step_end(self, result)
            self.check_finite()
            self.callbacks.on_train_end(self)
        except HyloError as err:
            self.close(done=False)
            if self.step > self.start_step:  # failed while running (a data file removed mid-run, ...): exit 1
                err.exit_code = 1
            raise
        except BaseException:
            self.close(done=False)
            raise
        self.close(done=True)
        return {**summary, "first_loss": self.summary.get("first_loss"), "last_loss": self.summary.get("last_loss")}

    def _train_step(self, batch: torch.Tensor) -> StepResult:
        def step() -> StepResult:
            return self.engine.train_step(batch, self.positions, skip_nonfinite=self.cfg.train.nan_policy == "skip",
                                          on_gradients=self.callbacks.gradient_hook(self), documents=self.documents,
                                          objective=self.objective)

        if not self.compile_fallback:
            return step()
        self.compile_fallback = False  # only the first step compiles
        try:
            return step()
        except Exception as err:  # noqa: BLE001 - only torch.compile's own failures are caught, the rest re-raised
            if not type(err).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            why = f"torch.compile failed on this model ({type(err).__name__}: {first})"
            if self.dims.dp > 1:  # DDP/FSDP2 may be half-way through a gradient reduction: no safe retry
                raise ConfigError(f"train.compile=auto: {why}; run again with train.compile=off") from err
            if self.is_main:
                print(f"[hylo] train.compile=auto: {why}; training with eager blocks. Set train.compile=off to "
                      "skip the attempt", flush=True)
            for block in self.blocks:
                block._compiled_call_impl = None  # (what nn.Module.compile set)
            self.compiled = False
            self.engine.optimizer.zero_grad(set_to_none=True)
            return step()

    def dry_run(self, remove_run_dir: bool) -> dict[str, Any]:
        """Everything built, the first batch read and its shape said; nothing trained or saved (a run dir this
        dry run created is removed)."""
        batch = next(self.loader)
        if self.is_main:
            where = f"resume from {self.resume_from}" if self.resume_from else "start from scratch"
            print(f"[hylo] dry run: {self.n_params / 1e6:.2f}M parameters built on {self.dims.world} rank(s), "
                  f"would {where} at step {self.start_step}; first batch {tuple(batch.shape)} (micro-steps x "
                  f"sequences x seq_len+1) read; nothing trained or saved", flush=True)
        self.close(done=False)
        if remove_run_dir and self.is_main:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return {"first_loss": None, "last_loss": None, "run_dir": str(self.run_dir), "start_step": self.start_step}

    def _account(self, result: StepResult) -> None:
        if not result.stepped:  # the engine skipped it (train.nan_policy=skip)
            self.skipped_steps += 1
            self.say(f"[hylo] step {self.step}: non-finite gradient, step skipped ({self.skipped_steps} so far)")
        elif self.cfg.train.nan_policy == "stop":  # remember the first non-finite step without waiting for it
            bad = ~torch.isfinite(result.grad_norm.to(self.device)) & (self._first_bad_step == 0)
            self._first_bad_step = torch.where(bad, self.step, self._first_bad_step)

    def check_finite(self) -> None:
        """Raise if a step since the start had a non-finite gradient (train.nan_policy=stop); reads the device."""
        bad = int(self._first_bad_step)
        if bad:
            raise TrainingDiverged(
                f"non-finite gradient norm at step {bad}; stopped without saving (the last good checkpoint is "
                f"{latest_checkpoint(self.ckpt_dir)}). Lower train.lr, check the data, or set train.nan_policy=skip")

    # ------------------------------------------------------------------------------------------- for callbacks
    def is_last_step(self) -> bool:
        return self.step == self.cfg.train.steps

    def is_log_step(self) -> bool:
        return self.step % self.cfg.logging.interval == 0 or self.is_last_step() or self.step == self.start_step + 1

    def log(self, scalars: dict[str, float], step: int | None = None) -> None:
        self.logger.log(self.step if step is None else step, scalars)

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason

    def cp_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the CP group: how a layer monitor turns a rank's partial statistics into the sequence's."""
        return self.dims.cp_sum(tensor)

    # ---------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.step * self.cfg.train.batch_size * self.cfg.train.seq_len,
                "skipped_steps": self.skipped_steps, "lineage": self.lineage}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = self.start_step = state["step"]
        self.skipped_steps = state.get("skipped_steps", 0)

    def checkpoint_state(self) -> dict[str, Any]:
        """trainer_state.json: the loop's counters, the schedule, the data position, the engine's marks and the
        stateful callbacks."""
        return {**self.state_dict(), "scheduler": self.scheduler.state_dict(), "data": self.loader.state_dict(),
                "data_source": self.data_source, "world_size": self.dims.world, "config": config_record(self.cfg),
                **({"distill_teacher": self.teacher.identity} if self.teacher is not None else {}),
                **self.engine.trainer_state_extras(), **self.callbacks.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["data"])
        if getattr(self.loader, "resume_note", None) and self.is_main:
            print(self.loader.resume_note, flush=True)
        self.callbacks.load_state_dict(state)

    # ---------------------------------------------------------------------------------------------- messages
    def _announce(self) -> None:
        if not self.is_main:
            return
        cfg, dims = self.cfg, self.dims
        where = (f"resuming from {self.resume_from}" if self.resume_from else
                 f"from the weights of {cfg.model.init_from}" if cfg.model.init_from else "from scratch")
        layout = f" (dp {dims.dp} x cp {dims.cp}, {cfg.parallel.cp_mode})" if dims.cp > 1 else ""
        print(f"[hylo] {self.n_params / 1e6:.2f}M params, layers {cfg.model.pattern} x{cfg.model.n_layers}, "
              f"{dims.world} rank(s){layout} on {self.device.type}, {where}; run dir {self.run_dir.resolve()}",
              flush=True)
        if self.start_step >= cfg.train.steps:
            print(f"[hylo] run already complete at step {self.start_step} ({self.resume_from}); nothing to do. "
                  f"To train on, raise train.steps (> {self.start_step}); to start afresh, give a new run.dir "
                  f"(or move {self.ckpt_dir} aside)", flush=True)

    def close(self, done: bool) -> None:
        self.loader.close()
        self.logger.close()
        self.lock.release()
        if self.is_main and done:
            ended = "done" if self.stop_reason is None else (f"stopped at step {self.step} of {self.cfg.train.steps} "
                                                              f"({self.stop_reason})")
            print(f"[hylo] {ended}. TensorBoard: tensorboard --logdir {(self.run_dir / 'tb').resolve()}\n"
                  f"[hylo] checkpoints: {self.ckpt_dir.resolve()}  config: {(self.run_dir / 'config.yaml').resolve()}",
                  flush=True)
