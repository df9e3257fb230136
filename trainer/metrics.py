"""What a run reports: TensorBoard scalars, a metrics.jsonl twin of them, and the device peak for MFU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
GPU_PEAK_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float:
    """FLOP/s one device can do: the config's value, a table for known GPUs, or a measured fp32 matmul on CPU."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return 312e12
    n, reps = 1024, 5
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def drop_torn_line(path: Path) -> None:
    """Cut a last line a killed run left half-written, so a resumed run appends whole lines only."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class MetricsLogger:
    """Rank 0 writes TensorBoard event files under `<run>/tb` and the same points to `<run>/metrics.jsonl`."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
            path = run_dir / "metrics.jsonl"
            drop_torn_line(path)
            self.jsonl = open(path, "a")  # noqa: SIM115 (closed in close())

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()

    def image(self, tag: str, image, step: int) -> None:
        """A (3, H, W) uint8 image, e.g. the passkey heat-map."""
        if self.enabled:
            self.writer.add_image(tag, image, step, dataformats="CHW")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
