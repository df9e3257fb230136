"""Ranks whose torchrun agent died: noticed at any moment, start-up included.

torchrun's agent is each worker's parent; `kill -9` of the agent leaves the workers running, re-parented to init
(or a subreaper).  The parent is recorded when this module is first imported — the entry points (trainer/cli.py,
trainer/train.py) import it among their first, torch-free imports, so that is at the very start of the process,
before torch loads and long before the process group exists (a parent recorded later may already be init, and the
loss would go unnoticed).

Two phases:
- start-up (rendezvous, process group, building the model, reading the checkpoint): nothing to save, and the
  rendezvous store lived in the dead agent, so a rank would hang or die in a network error.  A watchdog thread
  polls the parent every second and ends the process with one line.
- training: the preemption callback asks `launcher_died()` where the ranks agree (every step on one rank, at
  logging steps on several) and the run stops and saves, as for SIGTERM.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

PARENT_AT_START = os.getppid()
POLL_SECONDS = 1.0


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def _launcher_is_init() -> bool:
    """Whether torchrun itself runs as PID 1 (a container's entry point): then a parent of 1 is the launcher."""
    try:
        return b"torch" in Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return False


def launcher_died() -> bool:
    """Whether this torchrun worker's agent is gone: the parent changed since the process started, or it was
    already init when the process started (the agent died before this module was imported)."""
    if not under_torchrun():
        return False
    parent = os.getppid()
    return parent != PARENT_AT_START or (parent == 1 and not _launcher_is_init())


class StartupWatch:
    """Ends a torchrun worker whose agent dies during start-up, with one line, instead of hanging or printing a
    network traceback.  `training_started()` hands over to the preemption callback (which saves)."""

    def __init__(self):
        self._training = threading.Event()
        self._thread: threading.Thread | None = None
        if under_torchrun():
            self._thread = threading.Thread(target=self._watch, name="hylo-launcher-watch", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while not self._training.wait(POLL_SECONDS):
            if launcher_died():
                rank = os.environ.get("RANK", "?")
                print(f"[hylo] rank {rank}: the torchrun agent (pid {PARENT_AT_START}) died during start-up; "
                      "stopping (nothing trained yet, nothing to save). Launch the job again", file=sys.stderr,
                      flush=True)
                os._exit(1)

    def training_started(self) -> None:
        self._training.set()
