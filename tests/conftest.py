import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Without a GPU the Triton kernels run (exactly, slowly) on the CPU interpreter.  Triton reads this when a kernel
# is decorated, so it is set before any test imports the kernel modules.
# DeepSpeed likewise needs to be told to run on the CPU.
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_module(args: list[str], cwd: Path = ROOT, timeout: int = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**subprocess_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs every run; the seed is printed (shown on failure) and HYLO_TEST_SEED replays it."""
    import torch

    seed = int(os.environ.get("HYLO_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"torch seed {seed} (replay with HYLO_TEST_SEED={seed})")
    return seed


def run_layer_monitor(model, group: str, forward, **settings) -> dict[str, float]:
    """Drive trainer/callbacks/monitors.py's LayerMonitor for one due step around `forward()` (no Trainer): the
    scalars it logs."""
    from types import SimpleNamespace

    from hylo.trainer.callbacks.monitors import LayerMonitor

    logged: dict[str, float] = {}
    cfg = SimpleNamespace(train=SimpleNamespace(seq_len=0))
    trainer = SimpleNamespace(model=model, cfg=cfg, is_main=True, compiled=False, positions=None,
                              cp_reduce=lambda t: t, step=1, log=lambda scalars, step=None: logged.update(scalars))
    monitor = LayerMonitor(group, 1, group, **settings)
    monitor.on_train_start(trainer)
    monitor.on_step_start(trainer)
    forward()
    monitor.on_step_end(trainer, None)
    return logged
