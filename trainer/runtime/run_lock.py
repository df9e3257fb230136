"""One job per run dir: rank 0 holds an exclusive lock on `<run.dir>/hylo.lock` for the whole run.

The lock is an `flock` on the file, so the kernel drops it when the holding process dies however it dies
(`kill -9` included): a later job finds the file, takes the lock, and says whose lock it took over.  The file
names its holder (host, PID, start time) so a refused job can say who is in the way.  `flock` is coherent on local
disks and on shared filesystems mounted with lock support (NFSv4, Lustre `-o flock`); on a filesystem without it,
two hosts could both believe they hold the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "hylo.lock"


class RunDirLocked(Exception):
    """Another live job holds the run dir."""


class RunDirUnusable(RunDirLocked):
    """The run dir cannot be created or written."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise RunDirLocked naming the holder; returns a note when it took over the lock of a
        job that died without releasing it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirUnusable(f"run.dir {self.path.parent} cannot be written ({err.strerror or err}); point "
                                 "run.dir at a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunDirLocked(f"run dir {self.path.parent} is in use by another job ({holder}). Wait for it to "
                               "finish or stop it, or give this run another run.dir") from None
        previous = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        if previous:
            return (f"[hylo] took over the run dir lock of an earlier job that ended without releasing it "
                    f"({_describe(previous)})")
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"unreadable": True}


def _describe(holder: dict) -> str:
    if not holder or holder.get("unreadable"):
        return "holder unknown"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"
