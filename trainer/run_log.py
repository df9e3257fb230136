"""What a run reports: TensorBoard scalars and a metrics.jsonl twin of them (the run log)."""

from __future__ import annotations

import json
from pathlib import Path


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
