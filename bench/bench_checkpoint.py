"""Checkpoint save/load time with checksums on and off, and how long a save stalls training, sync vs async.

  python bench/bench_checkpoint.py [--record]

For each model size: build the model and AdamW state as the trainer does (one process), then time
  sync save    the whole `Checkpointer.save` (write + finalise), with the CRC32 manifest and without
  async stall  how long `Checkpointer.save` blocks the caller (staging the state); the write continues behind
  async total  until the background write is finalised
  load         `load_dcp` into a fresh model and optimizer, after verifying the manifest and without
Then a 2-rank torchrun training run with async saves in the middle: the stall each save put on rank 0's step.
Targets: verification adds at most 10% to load time on the 125M config (issue 16); the async stall is <= 20% of
a synchronous save (issue 6).  Prints tables (`--record` appends them to bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, publish  # noqa: E402

SIZES = {"tiny (configs/tiny.yaml)": [], "~50M (d 640 x 8)": ["model.d_model=640", "model.n_layers=8"],
         "~125M (configs/gpu_125m.yaml)": ["--config", "configs/gpu_125m.yaml"]}


def build(overrides: list[str]):
    import torch

    from hylo.models.lm import HybridLM
    from hylo.trainer.config import load_config
    from hylo.trainer.engines.optim import build_optimizer

    config = None
    if overrides[:1] == ["--config"]:
        config, overrides = overrides[1], overrides[2:]
    cfg = load_config(config, overrides + ["model.vocab_size=4096"])
    model = HybridLM(cfg.model)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    for p in model.parameters():  # materialise Adam's moments as a trained run would have them
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return model, optimizer, cfg


def measure(overrides: list[str], reps: int = 3) -> dict:
    from hylo.trainer.checkpointing import verify_checkpoint
    from hylo.trainer.checkpointing.dcp import DCPCheckpointer as Checkpointer
    from hylo.trainer.checkpointing.dcp import load_dcp

    model, optimizer, cfg = build(overrides)
    n = sum(p.numel() for p in model.parameters())
    state = {"step": 1, "tokens": 0, "scheduler": {}, "data": {}}
    out = {"params": n}
    with tempfile.TemporaryDirectory() as root:
        for label, checksums in (("sync", True), ("sync_plain", False)):
            saver = Checkpointer(Path(root) / label, checksums=checksums)
            times = []
            for i in range(reps):
                start = time.perf_counter()
                saver.save(i + 1, model, optimizer, state)
                times.append(time.perf_counter() - start)
            out[label] = min(times)
        background = Checkpointer(Path(root) / "async", async_save=True)
        stalls, totals = [], []
        for i in range(reps):
            start = time.perf_counter()
            background.save(i + 1, model, optimizer, state)
            stalls.append(background.last_stall)
            background.wait()
            totals.append(time.perf_counter() - start)
        out["stall"], out["async_total"] = min(stalls), min(totals)
        model2, optimizer2, _ = build(overrides)
        path = Path(root) / "sync" / f"step_{reps}"
        plain, verified = [], []
        for _ in range(reps):  # alternate, so both see the same page cache
            start = time.perf_counter()
            load_dcp(path, model2, optimizer2)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert verify_checkpoint(path) is None
            load_dcp(path, model2, optimizer2)
            verified.append(time.perf_counter() - start)
        out["load"], out["load_verified"] = min(plain), min(verified)
    return out


def async_stall_two_ranks() -> dict:
    """A 2-rank torchrun run (tiny config, async saves every 5 steps): the stall of each save on rank 0."""
    import json
    import os
    import socket
    import subprocess

    with tempfile.TemporaryDirectory() as run_dir, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        script = ("import sys, json, hylo.trainer.train as t\n"
                  "from hylo.trainer.checkpointing.step_folder import StepFolderWriter\n"
                  "stalls = []\n"
                  "save = StepFolderWriter.save\n"
                  "def timed(self, *a, **k):\n"
                  "    out = save(self, *a, **k); stalls.append(self.last_stall); return out\n"
                  "StepFolderWriter.save = timed\n"
                  "t.main(sys.argv[1:])\n"
                  "print('STALLS', json.dumps(stalls))\n")
        script_path = Path(run_dir) / "stall.py"
        script_path.write_text(script)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
               f"--rdzv_endpoint=127.0.0.1:{port}", str(script_path), f"run.dir={run_dir}/run", "train.steps=20",
               "checkpoint.interval=5", "checkpoint.async=true", "logging.progress=false", "train.batch_size=8"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        lines = [line for line in res.stdout.splitlines() if line.startswith("STALLS")]
        if res.returncode != 0 or not lines:
            return {"error": (res.stderr or res.stdout)[-300:]}
        stalls = json.loads(lines[0].split(" ", 1)[1])
        return {"stalls": stalls}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

    rows = ["### bench_checkpoint: save / load with and without checksums, async stall (local disk)",
            f"{machine()} · best of 3",
            "", "| model | params | save s | save, no checksums s | async stall s | stall / sync | async total s "
            "| load s | verify + load s | verify adds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ok = True
    for name, overrides in SIZES.items():
        r = measure(overrides)
        ratio = r["stall"] / r["sync"]
        extra = r["load_verified"] / r["load"] - 1
        ok &= ratio <= 0.2 if r["params"] > 20e6 else True
        rows.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['sync']:.3f} | {r['sync_plain']:.3f} | "
                    f"{r['stall']:.3f} | {ratio:.0%} | {r['async_total']:.3f} | {r['load']:.3f} | "
                    f"{r['load_verified']:.3f} | {extra:+.0%} |")
        print(rows[-1], flush=True)
    two = async_stall_two_ranks()
    if "stalls" in two:
        stalls = ", ".join(f"{s:.3f}" for s in two["stalls"])
        rows += ["", f"2-rank torchrun (tiny config, gloo), async saves at steps 5/10/15/20: stall per save on "
                 f"rank 0 = {stalls} s"]
    else:
        rows += ["", f"2-rank async run failed: {two['error']}"]
    print(rows[-1], flush=True)
    table = "\n".join(rows + [""])
    publish(table, record=args.record)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
