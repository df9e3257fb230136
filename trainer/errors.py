"""One error base for every `hylo` subcommand: a user error carries its exit code and a message that says what to
change, and the CLI prints it without a traceback.

  exit 2  refused before any work: an input is wrong — the config or the command's arguments (ConfigError), the
          data (DataError), a checkpoint to read that is missing, incomplete, corrupt or of another model
          (CheckpointError)
  exit 1  failed while running: a checkpoint could not be written (CheckpointWriteError), the loss diverged
          (TrainingDiverged), another rank or the launcher died (PeerLost), any of the above raised after the
          first step started (a data file removed mid-run)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class HyloError(Exception):
    """A failure the user can fix; `exit_code` is what the command returns."""

    exit_code = 1


class ConfigError(HyloError, ValueError):
    """A configuration the trainer refuses to start with; the message says what to change."""

    exit_code = 2


class DataError(HyloError, ValueError):
    """Missing, unreadable or inconsistent training data; the message says which file and what to do."""

    exit_code = 2


class CheckpointError(HyloError, RuntimeError):
    """A checkpoint that cannot be loaded; the message says what to do."""

    exit_code = 2


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (full disk, lost folder); earlier ones are intact."""

    exit_code = 1


class PeerLost(HyloError):
    """This rank lost its peers mid-run: another rank or the launcher died."""

    exit_code = 1


class TrainingDiverged(HyloError, FloatingPointError):
    """A non-finite loss or gradient with train.nan_policy=stop."""

    exit_code = 1


def run_command(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """A subcommand's exit code: its own, or its HyloError's after printing the message (no traceback)."""
    try:
        return main(argv)
    except HyloError as err:
        # Under torchrun every rank refuses a bad config, data or checkpoint alike: rank 0 alone says so; an error
        # while running (exit 1) may be one rank's own, and each rank says its own.
        if err.exit_code != 2 or os.environ.get("RANK", "0") == "0":
            print(f"[hylo] error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
