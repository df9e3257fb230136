"""Train a hybrid LM:  python -m trainer.train [--config configs/X.yaml] [key=value ...]

Works as is on one process, under `torchrun --standalone --nproc_per_node=N` and under multi-node torchrun.
The run itself is trainer/trainer.py's `Trainer`; this module is its command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from launch.distributed import destroy_distributed, init_distributed, peer_lost
from trainer.callbacks import Callback
from trainer.callbacks.profiler import oom_snapshot
from trainer.config import Config
from trainer.errors import run_command
from trainer.launcher_watch import StartupWatch
from trainer.resume import run_config
from trainer.trainer import Trainer


def train(cfg: Config, callbacks: Sequence[Callback] = ()) -> dict:
    """Run training to `train.steps`; returns a summary (first and last logged loss, where outputs are).
    `callbacks` are added after the config's own (trainer/callbacks/)."""
    watch = StartupWatch()  # a torchrun agent dying before the first step ends this rank with one line
    try:
        info = init_distributed(cfg.train.device, cfg.parallel.backend)
        snapshot = Path(cfg.run.dir) / f"oom_snapshot_rank{info.rank}.pickle"
        with oom_snapshot(cfg.profile.memory_snapshot, info.device, snapshot):
            trainer = Trainer(cfg, info, callbacks)
            watch.training_started()
            return trainer.fit()
    except Exception as err:
        if lost := peer_lost(err):  # a rank or the launcher died under a collective: one line, not a traceback
            raise lost from None
        raise
    finally:
        destroy_distributed()


def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(prog="hylo train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the embedded tiny config, configs/tiny.yaml)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="resume: the latest checkpoint in run.dir (no value) or a checkpoint folder "
                             "(--resume=PATH); key=value after --resume stays an override")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. train.steps=100 model.d_model=256")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        overrides.insert(0, args.resume)  # `--resume train.lr=1e-3`: an override, not a checkpoint path
        args.resume = "auto"
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    return args.config, overrides


def main(argv: list[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    def run(args: list[str] | None) -> int:
        config_path, overrides = parse_args(args)
        train(run_config(config_path, overrides), callbacks)
        return 0

    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
