"""Train a hybrid LM:  python -m hylo.trainer.train [--config configs/X.yaml] [key=value ...]

Works as is on one process, under `torchrun --standalone --nproc_per_node=N` and under multi-node torchrun.
The run itself is trainer/trainer.py's `Trainer`; this module is its command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hylo.trainer.arguments import parse
from hylo.trainer.errors import run_command
from hylo.trainer.runtime.launcher_watch import StartupWatch

if TYPE_CHECKING:  # torch and the training stack load only when a run starts, never for --help
    from hylo.trainer.callbacks import Callback
    from hylo.trainer.config import Config


def train(cfg: Config, callbacks: Sequence[Callback] = (), dry_run: bool = False,
          config_from: Path | None = None) -> dict:
    """Run training to `train.steps`; returns a summary (first and last logged loss, where outputs are).
    `callbacks` are added after the config's own (trainer/callbacks/).  `dry_run`: build everything (data, model,
    parallelism, engine, the checkpoint to resume), read the first batch, then stop without training or saving.
    `config_from`: the checkpoint `cfg` was read from (resume.run_config), checked against the one that loads."""
    watch = StartupWatch()  # a torchrun agent dying before the first step ends this rank with one line
    from hylo.trainer.callbacks.profiler import oom_snapshot
    from hylo.trainer.runtime.distributed import cpu_threads, destroy_distributed, init_distributed, peer_lost
    from hylo.trainer.trainer import Trainer

    try:
        info = init_distributed(cfg.train.device, cfg.parallel.backend)
        if info.device.type == "cpu":
            import torch

            threads, why = cpu_threads(cfg.train.cpu_threads)
            torch.set_num_threads(threads)
            if info.is_main:
                print(f"[hylo] CPU: {threads} intra-op thread(s) per rank ({why}; train.cpu_threads=N to choose)",
                      flush=True)
        snapshot = Path(cfg.run.dir) / f"oom_snapshot_rank{info.rank}.pickle"
        with oom_snapshot(cfg.profile.memory_snapshot, info.device, snapshot):
            new_run_dir = not Path(cfg.run.dir).exists()
            trainer = Trainer(cfg, info, callbacks, config_from=config_from)
            if dry_run:
                return trainer.dry_run(remove_run_dir=new_run_dir)
            watch.training_started()
            return trainer.fit()
    except Exception as err:
        if lost := peer_lost(err):  # a rank or the launcher died under a collective: one line, not a traceback
            raise lost from None
        raise
    finally:
        destroy_distributed()


def run(args: argparse.Namespace, callbacks: Sequence[Callback] = ()) -> int:
    """`hylo train` with its parsed arguments (trainer/arguments.py; `--resume` already folded into overrides)."""
    from hylo.trainer.checkpointing.resume import run_config
    from hylo.trainer.config import to_yaml

    cfg, config_from = run_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    train(cfg, callbacks, dry_run=args.dry_run, config_from=config_from)
    return 0


def main(argv: list[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """`python -m hylo.trainer.train [args]` (what torchrun starts on every rank): `hylo train [args]`."""
    return run_command(lambda args: run(parse("train", args), callbacks), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
