"""Where a training step's time goes: per layer type per token (forward, backward, recompute), and the share of
matmul, attention-op and elementwise/other time — the table every speed change of the hybrid is decided from.

  python bench/bench_profile.py --config configs/hybrid_tiny.yaml [key=value ...] [--steps 2] [--record]

Builds the run as `hylo train` does (Trainer: model, parallelism, engine, data), takes warm-up steps, then times
`--steps` steps:
  per block   hooks on every block: forward from its pre-hook to its hook; recompute is a forward that runs inside
              the backward (activation checkpointing); backward from the gradient reaching the block's output to
              it reaching its input (the recompute inside it subtracted); summed per layer type, divided by the
              step's tokens.  On a GPU each mark synchronises the device (the per-block times are then exact,
              the step slower than unprofiled).
  op classes  one more step under torch.profiler: each op's self time (device time on a GPU, CPU time on the
              CPU) as matmul (mm, addmm, bmm, linear, conv), attention ops (hylo's Triton ops, SDPA, FlashAttention,
              and the blockwise paths' kernels), or elementwise/other; plus the optimizer step.
On the CPU it runs the tiny configs (the same table, for the method); the GPU rows come from a lease.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, publish  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm",
          "aten::convolution", "aten::_convolution", "aten::conv1d", "aten::addmv", "aten::einsum")
ATTENTION = ("hylo::", "scaled_dot_product", "flash_attention", "_efficient_attention", "cudnn_attention", "triton")


class BlockTimer:
    """Forward, backward and recompute seconds of every block, by layer type (hooks; device synchronised)."""

    def __init__(self, model, device):
        import torch

        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.times: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.enabled = True
        self.in_backward = False  # from the first gradient reaching a block until the step ends (end_step)
        self.start: dict[int, float] = {}
        self.grad_out: dict[int, float] = {}
        self.recompute_during: dict[int, float] = defaultdict(float)
        self.child_start: dict[int, float] = {}
        for block in model.blocks:
            block.register_forward_pre_hook(self._pre)
            block.register_forward_hook(self._post)
            # checkpointing recomputes through the block's children (its own forward is wrapped): time them there
            for child in block.children():
                child.register_forward_pre_hook(lambda m, a: self._child_pre(m))
                child.register_forward_hook(self._child_hook(id(block), block.layer_type))

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def _pre(self, block, args):
        if self.enabled:
            self.start[id(block)] = self.now()

    def _post(self, block, args, out):
        import torch

        if not self.enabled:
            return
        elapsed = self.now() - self.start.pop(id(block))
        if self.in_backward:  # (a block recomputed whole; checkpointing's recompute is timed by its children)
            self.times[block.layer_type]["recompute"] += elapsed
            self.recompute_during[id(block)] += elapsed
            return
        self.times[block.layer_type]["forward"] += elapsed
        x = args[0]
        key, layer = id(block), block.layer_type
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda g: self._backward_starts(key) or g)
        if isinstance(x, torch.Tensor) and x.requires_grad:
            x.register_hook(lambda g: self._backward_ends(key, layer) or g)

    def _child_hook(self, key: int, layer: str):
        return lambda child, args, out: self._child_post(child, key, layer)

    def end_step(self) -> None:
        self.in_backward = False
        self.start.clear()
        self.grad_out.clear()
        self.child_start.clear()

    def _child_pre(self, child) -> None:
        if self.enabled and self.in_backward:
            self.child_start[id(child)] = self.now()

    def _child_post(self, child, key: int, layer: str) -> None:
        if self.enabled and id(child) in self.child_start:
            elapsed = self.now() - self.child_start.pop(id(child))
            self.times[layer]["recompute"] += elapsed
            self.recompute_during[key] += elapsed

    def _backward_starts(self, key: int) -> None:
        self.in_backward = True
        self.recompute_during[key] = 0.0
        self.grad_out[key] = self.now()

    def _backward_ends(self, key: int, layer: str) -> None:
        if key in self.grad_out:
            spent = self.now() - self.grad_out.pop(key) - self.recompute_during.pop(key, 0.0)
            self.times[layer]["backward"] += spent


def op_classes(prof, on_gpu: bool) -> dict[str, float]:
    """Seconds of self time per class of op."""
    shares: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        seconds = (event.self_device_time_total if on_gpu else event.self_cpu_time_total) / 1e6
        name = event.key
        if name.startswith(("ProfilerStep", "aten::backward")) or seconds <= 0:
            continue
        if "Optimizer.step" in name or "adam" in name.lower() or "_foreach_" in name:
            shares["optimizer"] += seconds
        elif name.startswith(MATMUL):
            shares["matmul"] += seconds
        elif any(mark in name for mark in ATTENTION):
            shares["attention ops"] += seconds
        elif not name.startswith(("autograd::", "Optimizer", "##", "enumerate")):
            shares["elementwise / other"] += seconds
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/hybrid_tiny.yaml")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after two warm-up steps)")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import tempfile

    import torch

    from hylo.trainer.config import load_config
    from hylo.trainer.runtime.distributed import init_distributed
    from hylo.trainer.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(args.config, [*args.overrides, f"run.dir={run_dir}", "checkpoint.interval=0",
                                        "logging.progress=false", "checkpoint.resume=none"])
        trainer = Trainer(cfg, init_distributed(cfg.train.device, cfg.parallel.backend))
        model = trainer.engine.model
        plain = getattr(model, "module", model)  # DDP's wrapped model
        tokens = cfg.train.batch_size * cfg.train.seq_len // trainer.dims.world

        def step():
            batch = next(trainer.loader).to(trainer.device).long()
            trainer.engine.train_step(batch, trainer.positions, documents=trainer.documents)

        for _ in range(2):
            step()
        timer = BlockTimer(plain, trainer.device)
        started = timer.now()
        for _ in range(args.steps):
            step()
            timer.end_step()
        step_seconds = (timer.now() - started) / args.steps
        timer.enabled = False  # the profiled step below is not timed per block
        activities = [torch.profiler.ProfilerActivity.CPU]
        if trainer.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            step()
        classes = op_classes(prof, trainer.device.type == "cuda")
        trainer.close(done=False)

    per_token = 1e6 / (tokens * args.steps)  # seconds summed over the timed steps -> microseconds per token
    rows = []
    for layer, t in sorted(timer.times.items()):
        n = sum(1 for b in plain.blocks if b.layer_type == layer)
        rows.append(f"| {layer} | {n} | {t['forward'] * per_token:.2f} | {t['backward'] * per_token:.2f} | "
                    f"{t['recompute'] * per_token:.2f} | "
                    f"{(t['forward'] + t['backward'] + t['recompute']) / n * per_token:.2f} |")
    blocks = sum(sum(t.values()) for t in timer.times.values()) / args.steps
    total_ops = sum(classes.values()) or 1.0
    lines = [
        f"### bench_profile: {Path(args.config).name} {' '.join(args.overrides)} — one step of "
        f"{tokens:,} tokens per rank — {machine()}", "",
        "| layer type | blocks | forward µs/token | backward µs/token | recompute µs/token | per block µs/token |",
        "|---|---:|---:|---:|---:|---:|", *rows, "",
        f"Step {step_seconds * 1e3:.1f} ms, of which the blocks {blocks * 1e3:.1f} ms "
        f"({blocks / step_seconds:.0%}; the rest: embedding, head and loss, optimizer, data).", "",
        "| op class | share of op time |", "|---|---:|",
        *[f"| {name} | {seconds / total_ops:.0%} |" for name, seconds in sorted(classes.items(), key=lambda x: -x[1])],
        ""]
    publish("\n".join(lines), record=args.record)


if __name__ == "__main__":
    main()
