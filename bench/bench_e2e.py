"""End-to-end training throughput, MFU and peak memory of the 1B presets against a dense model, on one GPU.

  python bench/bench_e2e.py [--configs dense_1b,hybrid_1b,rat_swa_1b,based_1b,tnl_1b] [--lengths 8192,32768,131072]
                            [--compile off,on] [--steps 6 --warmup 3] [--time-limit 120]

One `hylo.trainer.train` process per (config, length, compile), one sequence per step (batch_size = micro = 1), bf16,
activation checkpointing from 32K on, checkpoints and evals off.  tokens/s and MFU are the trainer's own numbers
over the steps after --warmup; peak memory is torch.cuda.max_memory_allocated, beside what `hylo plan` predicts
for the same run (its total without the CUDA context and fragmentation line, which the allocator does not count).
One table with each hybrid's speed-up over the dense model at the same length; each row goes to bench/RESULTS.md
as soon as it is measured.
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

from bench.record import StreamedTable, machine  # noqa: E402


def overrides_for(seq_len: int, compiled: bool, args) -> list[str]:
    return [f"train.seq_len={seq_len}", "train.batch_size=1", "train.micro_batch_size=1",
            f"train.steps={args.warmup + args.steps}", f"logging.interval={args.warmup}",
            "checkpoint.interval=0", "eval.interval=0", "logging.sink_interval=0", "logging.layer_interval=0",
            "logging.progress=false", "train.dtype=bf16", f"train.compile={str(compiled).lower()}",
            f"train.activation_checkpointing={'full' if seq_len >= 32768 else 'none'}"]


def split_entry(entry: str) -> tuple[str, list[str]]:
    """A --configs entry: a preset name, optionally with overrides after colons (hybrid_1b:model.rat.backend=flash)."""
    name, *extra = entry.split(":")
    return name, extra


def planned_gib(config: str, seq_len: int, compiled: bool, args) -> float | None:
    """hylo plan's allocator bytes for the run (its total less the CUDA context + fragmentation line)."""
    try:
        from hylo.trainer.config import load_config
        from hylo.trainer.data.tokenizer import load_tokenizer
        from hylo.trainer.memory_plan import GiB, plan_memory

        name, extra = split_entry(config)
        cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"), overrides_for(seq_len, compiled, args) + extra)
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = 64 * -(-load_tokenizer(cfg.data.tokenizer).get_vocab_size() // 64)
        plan = plan_memory(cfg, 1, 1e6)
        return sum(b for name, b, _ in plan.lines if name != "runtime") / GiB
    except Exception as err:  # the plan is a column, not a reason to lose the timing
        print(f"[bench_e2e] plan failed: {err}", file=sys.stderr)
        return None


def run(config: str, seq_len: int, compiled: bool, args) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        name, extra = split_entry(config)
        overrides = [f"run.dir={run_dir}", *overrides_for(seq_len, compiled, args), *extra]
        try:
            res = subprocess.run([sys.executable, "-m", "hylo.trainer.train", "--config", f"configs/{name}.yaml",
                                  *overrides], cwd=ROOT, capture_output=True, text=True, timeout=args.time_limit,
                                 env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
        except subprocess.TimeoutExpired:
            return {"error": f"over {args.time_limit}s"}
        if res.returncode:
            tail = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"
            return {"error": "OOM" if "out of memory" in res.stderr.lower() else tail[:80]}
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["step"] > args.warmup and "train/tokens_per_sec" in r][-1]
    return {"tok_s": last["train/tokens_per_sec"], "mfu": last["train/mfu"], "mem": last.get("train/mem_gb", 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # dense first; an entry may add overrides after colons: hybrid_1b:model.rat.backend=flash
    parser.add_argument("--configs", default="dense_1b,hybrid_1b,rat_swa_1b,based_1b,tnl_1b")
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--compile", default="off,on")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--time-limit", type=int, default=150, help="seconds per run")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    table = StreamedTable([f"### End to end, one GPU: 1B presets vs dense ({args.steps} timed steps, 1 sequence/step, "
                           "bf16, activation checkpointing from 32K)", machine(), "",
                           "| config | T | compile | tokens/s | vs dense | MFU | peak GiB | planned GiB |",
                           "|---|---|---|---|---|---|---|---|"], record=args.record)
    results = {}
    for compiled in [c == "on" for c in args.compile.split(",")]:
        for seq_len in map(int, args.lengths.split(",")):
            for config in args.configs.split(","):  # dense first (the default order): the ratios need it
                results[config, seq_len, compiled] = r = run(config, seq_len, compiled, args)
                gib = planned_gib(config, seq_len, compiled, args)
                plan = "-" if gib is None else f"{gib:.1f}"
                mode = "on" if compiled else "off"
                if "error" in r:
                    table.row(f"| {config} | {seq_len // 1024}K | {mode} | {r['error']} | | | | {plan} |")
                    continue
                dense = results.get(("dense_1b", seq_len, compiled), {})
                ratio = f"{r['tok_s'] / dense['tok_s']:.2f}x" if "tok_s" in dense else "-"
                table.row(f"| {config} | {seq_len // 1024}K | {mode} | {r['tok_s']:,.0f} | {ratio} | {r['mfu']:.1%} | "
                          f"{r['mem']:.1f} | {plan} |")

if __name__ == "__main__":
    main()
