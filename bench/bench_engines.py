"""Step time of the torch engine (DDP, FSDP2) and the DeepSpeed engine (ZeRO 1/2/3) for one config, side by side.

  python bench/bench_engines.py --config configs/hybrid_1b.yaml --nproc 1 --steps 10 --warmup 3 [key=value ...]
  DS_ACCELERATOR=cpu python bench/bench_engines.py --nproc 2          (CPU: the tiny config, relative numbers only)

Each variant is one `torchrun -m hylo.trainer.train` process group with checkpoints off; tokens/s is measured over the
steps after `--warmup`.  Prints a table (ratio to the FSDP2 row, or DDP where FSDP2 is not run) and appends it to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, publish  # noqa: E402

VARIANTS = {
    "torch DDP": [],
    "torch FSDP2": ["parallel.dp_shard=true"],
    "deepspeed ZeRO-1": ["train.engine=deepspeed", "deepspeed.zero_stage=1"],
    "deepspeed ZeRO-2": ["train.engine=deepspeed", "deepspeed.zero_stage=2"],
    "deepspeed ZeRO-3": ["train.engine=deepspeed", "deepspeed.zero_stage=3"],
}


def run_variant(config: str | None, nproc: int, steps: int, warmup: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        args = [f"run.dir={run_dir}", f"train.steps={warmup + steps}", "checkpoint.interval=0",
                f"logging.interval={warmup}", "logging.progress=false", "logging.sink_interval=0", *extra]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "hylo.trainer.train", *(["--config", config] if config else []), *args]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if res.returncode:
            return {"error": res.stderr.strip().splitlines()[-1][:120] if res.stderr.strip() else "failed"}
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > warmup and "train/tokens_per_sec" in r]
    return {"tokens_per_sec": timed[-1]["train/tokens_per_sec"], "mfu": timed[-1]["train/mfu"],
            "mem_gb": timed[-1].get("train/mem_gb", float("nan")), "loss": timed[-1]["train/loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from the table")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = {name: run_variant(args.config, args.nproc, args.steps, args.warmup, [*VARIANTS[name], *args.overrides])
               for name in args.variants.split(",")}
    base = next((results[n] for n in ("torch FSDP2", "torch DDP") if "tokens_per_sec" in results.get(n, {})), None)
    lines = [f"### Engines: torch vs DeepSpeed — {args.config or 'tiny (default)'}, {args.nproc} rank(s), "
             f"{args.steps} timed steps {' '.join(args.overrides)}",
             f"{machine()}", "",
             "| engine | tokens/s | vs torch | MFU | peak mem GiB | loss at end |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | |")
            continue
        ratio = r["tokens_per_sec"] / base["tokens_per_sec"] if base else float("nan")
        mem = "n/a (CPU)" if r["mem_gb"] != r["mem_gb"] else f"{r['mem_gb']:.1f}"
        lines.append(f"| {name} | {r['tokens_per_sec']:,.0f} | {ratio:.2f}x | {r['mfu']:.1%} | {mem} | "
                     f"{r['loss']:.3f} |")
    publish("\n".join(lines) + "\n", record=args.record)


if __name__ == "__main__":
    main()
