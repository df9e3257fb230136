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


def cut_redone_rows(path: Path, start_step: int) -> int:
    """A run that starts at `start_step` (a resume, or a fresh start after a crash before the first checkpoint)
    redoes every later step: the rows an earlier attempt logged for them move to metrics.superseded.jsonl, so each
    step appears once in metrics.jsonl.  Returns how many moved."""
    if not path.is_file():
        return 0
    keep, redone = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            step = json.loads(line).get("step", 0)
        except ValueError:
            step = 0  # not ours to judge: kept
        (redone if isinstance(step, int) and step > start_step else keep).append(line)
    if redone:
        with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
            f.writelines(redone)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)
    return len(redone)


class MetricsLogger:
    """Rank 0 writes TensorBoard event files under `<run>/tb` and the same points to `<run>/metrics.jsonl`; a run
    starting at `start_step` (the trainer always says) first sets aside what an earlier attempt logged for the
    steps it redoes (TensorBoard hides them too: purge_step)."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int | None = None):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            path = run_dir / "metrics.jsonl"
            drop_torn_line(path)
            if start_step is not None and (moved := cut_redone_rows(path, start_step)):
                print(f"[hylo] {moved} metrics row(s) of steps after {start_step}, logged before this run resumed "
                      f"there, moved to {path.with_name('metrics.superseded.jsonl')}", flush=True)
            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"),
                                        purge_step=None if start_step is None else start_step + 1)
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
