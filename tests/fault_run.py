"""Fault injection for the resilience tests, kept out of the production path: `python -m tests.fault_run <train
args>` runs `hylo.trainer.train` with one extra callback.  HYLO_FAULT="<kind>:<step>[:<rank>]" makes that rank
(default 0)

  kill          SIGKILL itself at the start of that step,
  kill_in_save  SIGKILL itself inside that step's checkpoint save, after the shards are written,
  kill_in_prune SIGKILL itself inside that step's pruning (checkpoint.keep_last), a folder renamed for deletion
                but not yet deleted,
  nan           turn that step's model output (so its loss and gradients) into NaN,
  delete_data   delete every file of data.path (a folder) at the start of that step,
  slow_start    (the number is seconds, not a step) sleep that long in start-up, before joining the process group,

on the first attempt only (a run restarted by `torchrun --max-restarts` carries TORCHELASTIC_RESTART_COUNT > 0).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from hylo.trainer.callbacks import Callback
from hylo.trainer.train import main


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class FaultInjector(Callback):
    def __init__(self, spec: str):
        kind, step, *rank = spec.split(":")
        self.kind, self.step, self.rank = kind, int(step), int(rank[0]) if rank else 0
        self.armed = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def _due(self, trainer) -> bool:
        return self.armed and trainer.step == self.step and trainer.dims.rank == self.rank

    def on_train_start(self, trainer) -> None:
        if self.kind == "nan":
            trainer.model.register_forward_hook(lambda m, a, out: out * float("nan") if self._due(trainer) else out)
        elif self.kind == "kill_in_save":
            write = trainer.checkpointer._write

            def write_then_die(tmp, state):
                write(tmp, state)
                if self._due(trainer):
                    _kill()
            trainer.checkpointer._write = write_then_die
        elif self.kind == "kill_in_prune":
            remove = trainer.checkpointer._remove

            def rename_then_die(path):
                if self._due(trainer):
                    path.rename(path.with_name(path.name + ".pruning"))
                    _kill()
                remove(path)
            trainer.checkpointer._remove = rename_then_die

    def on_step_start(self, trainer) -> None:
        if self.kind == "kill" and self._due(trainer):
            _kill()
        if self.kind == "delete_data" and self._due(trainer):
            for file in Path(trainer.cfg.data.path).iterdir():
                file.unlink()


def _slow_start(seconds: float) -> None:
    import hylo.trainer.runtime.distributed  # hylo.trainer.train imports init_distributed from here when a run starts

    join = hylo.trainer.runtime.distributed.init_distributed

    def slow_join(*args, **kwargs):
        time.sleep(seconds)
        return join(*args, **kwargs)
    hylo.trainer.runtime.distributed.init_distributed = slow_join


if __name__ == "__main__":
    spec = os.environ.get("HYLO_FAULT", "")
    if spec.startswith("slow_start:"):
        _slow_start(float(spec.split(":")[1]))
        spec = ""
    sys.exit(main(sys.argv[1:], callbacks=[FaultInjector(spec)] if spec else []))
