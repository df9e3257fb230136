"""Train a hybrid LM:  python -m trainer.train [--config configs/X.yaml] [key=value ...]

Works as is on one process, under `torchrun --standalone --nproc_per_node=N` and under multi-node torchrun.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from launch.distributed import DistInfo, destroy_distributed, init_distributed
from models import HybridLM
from models.attention import collect_sink_stats, request_sink_monitor
from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.context_parallel import apply_context_parallel, build_mesh, cp_config_problem, make_context
from trainer.checkpoint import CheckpointError, latest_checkpoint
from trainer.config import Config, ConfigError, DataConfig, check_batch_layout, load_config, to_yaml
from trainer.data import DataLoader
from trainer.engine import build_engine
from trainer.evaluate import eval_batches, run_eval_tasks
from trainer.export import load_weights
from trainer.faults import fault_due, maybe_kill
from trainer.metrics import MetricsLogger, peak_flops
from trainer.monitor import (
    LossSpikes,
    ProfileWindow,
    collect_state_norms,
    layer_grad_norms,
    oom_snapshot,
    request_state_monitor,
)
from trainer.optim import build_scheduler
from trainer.preemption import PreemptionWatcher
from trainer.recall import MQARLoader, mqar_spec
from trainer.shards import DataError
from trainer.tokenizer import load_tokenizer


def _mean_over_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if value.is_cuda else dist.ReduceOp.SUM)
        if not value.is_cuda:
            value /= dist.get_world_size()
    return value.item()


def sink_scalars(stats: dict[int, dict[str, torch.Tensor]]) -> dict[str, float]:
    """TensorBoard scalars from the sink monitor: sinks/layer{i}/{what}/head{h} and per-layer summaries."""
    scalars = {}
    for layer, s in sorted(stats.items()):
        prefix = f"sinks/layer{layer}"
        for h in range(len(s["sink_mass"])):
            scalars[f"{prefix}/sink_mass/head{h}"] = float(s["sink_mass"][h])
            scalars[f"{prefix}/first_token_mass/head{h}"] = float(s["first_token_mass"][h])
            scalars[f"{prefix}/secondary_top_mass/head{h}"] = float(s["secondary_mass"][h, 0])
            scalars[f"{prefix}/secondary_top_position/head{h}"] = float(s["secondary_pos"][h, 0])
        scalars[f"{prefix}/secondary_sinks"] = float(s["secondary_count"].sum())
    return scalars


def _resume_path(cfg: Config, ckpt_dir: Path) -> Path | None:
    resume = cfg.checkpoint.resume
    if resume == "auto":
        return latest_checkpoint(ckpt_dir)
    if resume == "none":
        if latest_checkpoint(ckpt_dir) is not None:
            raise ConfigError(
                f"checkpoint.resume=none but {ckpt_dir} already holds checkpoints that this run would overwrite; "
                "use a new run.dir, or checkpoint.resume=auto to continue"
            )
        return None
    return Path(resume)


def train(cfg: Config) -> dict:
    """Run training to `train.steps`; returns a summary (first and last logged loss, where outputs are)."""
    info: DistInfo = init_distributed(cfg.train.device, cfg.parallel.backend)
    snapshot = Path(cfg.run.dir) / f"oom_snapshot_rank{info.rank}.pickle"
    try:
        with oom_snapshot(cfg.profile.memory_snapshot, info.device, snapshot):
            return _train(cfg, info)
    finally:
        destroy_distributed()


def _train(cfg: Config, info: DistInfo) -> dict:
    problem = cp_config_problem(cfg, info.world)
    if problem:
        raise ConfigError(problem)
    cp = cfg.parallel.cp
    dp, dp_rank, cp_ctx = info.world // cp, info.rank // cp, None
    micro, accum = check_batch_layout(cfg, dp)  # accumulation steps = the loader batch's first dim
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    run_dir, device, seq_len = Path(cfg.run.dir), info.device, cfg.train.seq_len

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 64 * -(-tokenizer.get_vocab_size() // 64)
    elif cfg.model.vocab_size < tokenizer.get_vocab_size() and cfg.data.format != "mqar":  # MQAR ids are not text
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} < the tokenizer's {tokenizer.get_vocab_size()}")
    if cfg.data.format == "mqar":
        loader = MQARLoader(mqar_spec(cfg), cfg.train.batch_size, micro, dp_rank, dp, cfg.train.seed)
    else:
        loader = DataLoader(cfg.data, tokenizer, seq_len=seq_len, global_batch=cfg.train.batch_size,
                            micro_batch=micro, rank=dp_rank, world=dp, seed=cfg.train.seed)

    model = HybridLM(cfg.model).to(device)
    if cfg.model.init_from and _resume_path(cfg, run_dir / "checkpoints") is None:
        load_weights(model, cfg.model.init_from)
    if cp > 1:  # ranks r*cp .. r*cp+cp-1 share sequences; gradients still average over all ranks
        mesh = build_mesh(info.world, cp, device)
        cp_ctx = make_context(mesh, seq_len, cfg.parallel.cp_mode, cfg.parallel.ulysses)
        apply_context_parallel(model, cp_ctx, seq_len)
    cp_positions = None if cp_ctx is None else cp_ctx.positions(device)  # global positions of this rank's tokens
    flops_per_token = model.flops_per_token(seq_len)
    n_params = model.num_params()
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        for block in model.blocks:
            block.compile()
    spikes = LossSpikes(cfg.logging.spike_zscore)
    unchecked: list[tuple[int, torch.Tensor]] = []  # (step, loss) not yet seen by the spike detector
    engine = build_engine(model, cfg, info.world, micro, accum, device)  # data parallelism, optimizer, step
    model = engine.model
    ckpt_dir = run_dir / "checkpoints"
    checkpointer = engine.checkpointer(ckpt_dir)
    scheduler = build_scheduler(engine.optimizer, cfg)

    start_step = 0
    resume_from = _resume_path(cfg, ckpt_dir)
    if resume_from is not None:
        state = engine.load(resume_from)
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["data"])
        start_step = state["step"]
        spikes.load_state_dict(state.get("loss_spikes", spikes.state_dict()))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        where = f"resuming from {resume_from}" if resume_from else "from scratch"
        layout = f" (dp {dp} x cp {cp}, {cfg.parallel.cp_mode})" if cp > 1 else ""
        print(f"[hylo] {n_params / 1e6:.2f}M params, layers {cfg.model.pattern} x{cfg.model.n_layers}, "
              f"{info.world} rank(s){layout} on {device.type}, {where}; run dir {run_dir.resolve()}", flush=True)

    logger = MetricsLogger(run_dir, enabled=info.is_main)
    eval_data = None
    if cfg.eval.interval and "ppl" in cfg.eval.tasks:
        ev = cfg.eval
        eval_len = ev.seq_len or seq_len
        eval_source = DataConfig(**{**cfg.data.__dict__, "path": ev.data_path, "prefetch": 0})
        eval_data = [b.to(device) for b in eval_batches(eval_source, tokenizer, eval_len, ev.batch_size, ev.batches,
                                                        dp_rank, dp)]
    peak = peak_flops(device, cfg.logging.peak_tflops) * info.world
    tokens_per_step = cfg.train.batch_size * seq_len
    bar = None
    if info.is_main and cfg.logging.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", dynamic_ncols=True)
    first_loss = last_loss = None
    loss_acc = torch.zeros((), device=device)
    window_start, window_steps, loss_steps = time.perf_counter(), 0, 0
    model.train()
    sink_every = cfg.logging.sink_interval if cp == 1 else 0  # the monitor needs whole sequences
    preemption = PreemptionWatcher(device)
    skipped = 0
    layer_every = cfg.logging.layer_interval
    profiler = ProfileWindow(cfg.profile.enabled, cfg.profile.start_step, cfg.profile.steps, run_dir / "tb" / "profile",
                             info.rank, device)

    def check_spikes() -> None:
        values = torch.stack([loss for _, loss in unchecked]).tolist() if unchecked else []
        for (at, _), value in zip(unchecked, values, strict=True):
            z = spikes.update(value)
            if z is not None:
                logger.log(at, {"train/loss_spike_zscore": z})
                print(f"[hylo] step {at}: loss spike ({z:.1f} std devs above the running mean)", flush=True)
        unchecked.clear()

    def save(step: int) -> Path:
        check_spikes()
        trainer_state = {"step": step, "tokens": step * tokens_per_step, "skipped_steps": skipped,
                         "scheduler": scheduler.state_dict(), "data": loader.state_dict(),
                         "engine": cfg.train.engine, "world_size": info.world,
                         "loss_spikes": spikes.state_dict()}
        if engine.name == "deepspeed":
            trainer_state["zero_stage"] = cfg.deepspeed.zero_stage
        path = checkpointer.save(step, model, engine.optimizer, trainer_state)
        if bar is not None:
            bar.write(f"[hylo] {'saving' if cfg.checkpoint.async_save else 'saved'} checkpoint {path}")
        return path

    def evaluate(step: int) -> None:
        model.eval()
        scalars = run_eval_tasks(model, cfg, tokenizer, device, eval_data, cp_positions, logger, step,
                                 autocast=engine.autocast)
        model.train()
        logger.log(step, scalars)
        if bar is not None:
            bar.write(f"[hylo] step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()
                                                          if k.count("/") == 1))

    for step in range(start_step + 1, cfg.train.steps + 1):
        maybe_kill("kill", step, info.rank)
        profiler.step(step)
        checkpointer.poll()
        batch = next(loader).to(device, non_blocking=True).long()
        if sink_every and step % sink_every == 0:
            request_sink_monitor(model, cfg.logging.sink_queries, cfg.logging.sink_threshold)
        layer_due = layer_every and step % layer_every == 0
        if layer_due and cp == 1:  # a rank's final state is only the sequence's on one rank
            request_state_monitor(model)
        step_loss = engine.forward_backward(batch, cp_positions, poison=fault_due("nan", step, info.rank))
        grad_norm = engine.clip_gradients()
        if layer_due and engine.name == "torch":  # DeepSpeed has already stepped and zeroed its gradients
            logger.log(step, layer_grad_norms(model, cfg.model.n_layers))
        if not torch.isfinite(grad_norm):  # identical on every rank: they all decide alike
            if cfg.train.nan_policy == "stop":
                raise FloatingPointError(
                    f"non-finite gradient norm at step {step}; stopped without saving (the last good checkpoint "
                    f"is {latest_checkpoint(ckpt_dir)}). Lower train.lr, check the data, or set "
                    "train.nan_policy=skip")
            skipped += 1  # its loss stays out of the logged mean
            if bar is not None:
                bar.write(f"[hylo] step {step}: non-finite gradient, step skipped ({skipped} so far)")
        else:
            engine.optimizer_step()
            loss_acc += step_loss
            loss_steps += 1
        scheduler.step()
        engine.zero_grad()
        window_steps += 1
        if sink_every and step % sink_every == 0:
            logger.log(step, sink_scalars(collect_sink_stats(model)))
        if layer_due and cp == 1:
            logger.log(step, collect_state_norms(model))
        if info.is_main and spikes.zscore > 0:
            unchecked.append((step, step_loss))  # rank 0's loss, checked at the next logging step (no sync here)

        last = step == cfg.train.steps
        if step % cfg.logging.interval == 0 or last or step == start_step + 1:
            mean_loss = _mean_over_ranks(loss_acc / max(loss_steps, 1))
            check_spikes()
            elapsed = time.perf_counter() - window_start
            tokens_per_sec = window_steps * tokens_per_step / elapsed
            scalars = {
                "train/loss": mean_loss,
                "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": float(grad_norm),
                "train/tokens_per_sec": tokens_per_sec,
                "train/mfu": flops_per_token * tokens_per_sec / peak,
            }
            if device.type == "cuda":
                scalars["train/mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            logger.log(step, scalars)
            first_loss = mean_loss if first_loss is None else first_loss
            last_loss = mean_loss
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tokens_per_sec:,.0f}")
            loss_acc.zero_()
            window_start, window_steps, loss_steps = time.perf_counter(), 0, 0
        if bar is not None:
            bar.update(1)

        interval = cfg.checkpoint.interval
        if interval and (step % interval == 0 or last):
            save(step)
            window_start = time.perf_counter()  # keep checkpoint time out of tokens/s
        if cfg.eval.interval and (step % cfg.eval.interval == 0 or last):
            evaluate(step)
            window_start = time.perf_counter()  # keep evaluation time out of tokens/s
        if preemption.requested():
            if not (interval and (step % interval == 0 or last)):
                save(step)
            checkpointer.wait()
            if info.is_main:
                print(f"[hylo] preempted: saved step {step}; resume with checkpoint.resume=auto", flush=True)
            break

    checkpointer.wait()
    profiler.close()
    preemption.close()
    loader.close()
    logger.close()
    if bar is not None:
        bar.close()
    if info.is_main:
        if start_step >= cfg.train.steps:
            print(f"[hylo] run already complete at step {start_step} ({resume_from}); nothing to do", flush=True)
        print(f"[hylo] done. TensorBoard: tensorboard --logdir {(run_dir / 'tb').resolve()}\n"
              f"[hylo] checkpoints: {ckpt_dir.resolve()}  config: {(run_dir / 'config.yaml').resolve()}", flush=True)
    return {"first_loss": first_loss, "last_loss": last_loss, "run_dir": str(run_dir), "start_step": start_step}


def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(prog="hylo train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the embedded tiny config, configs/tiny.yaml)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="resume: latest checkpoint in run.dir (no value) or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. train.steps=100 model.d_model=256")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    return args.config, overrides


def main(argv: list[str] | None = None) -> int:
    config_path, overrides = parse_args(argv)
    try:
        cfg = load_config(config_path, overrides)
        train(cfg)
    except (ConfigError, FileNotFoundError, DataError) as err:
        print(f"[hylo] error: {err}", file=sys.stderr, flush=True)
        return 2
    except (CheckpointError, FloatingPointError) as err:
        print(f"[hylo] error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
