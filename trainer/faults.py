"""Fault injection for the resilience tests: HYLO_FAULT="<kind>:<step>[:<rank>]" makes the given rank (default 0)

  kill          SIGKILL itself at the start of that step,
  kill_in_save  SIGKILL itself inside that step's checkpoint save, after the shards are written,
  nan           turn that step's loss into NaN,

on the first attempt only (a run restarted by `torchrun --max-restarts` carries TORCHELASTIC_RESTART_COUNT > 0).
Never set in normal runs.
"""

from __future__ import annotations

import os
import signal


def fault_due(kind: str, step: int, rank: int) -> bool:
    spec = os.environ.get("HYLO_FAULT", "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    parts = spec.split(":")
    return parts[0] == kind and int(parts[1]) == step and int(parts[2] if len(parts) > 2 else 0) == rank


def maybe_kill(kind: str, step: int, rank: int) -> None:
    if fault_due(kind, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
