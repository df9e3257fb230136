"""Shared by the bench scripts: the machine line of a result table, and appending a table to bench/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """'<date> · <device>, torch <version>': the GPU's name where there is one, else the CPU's core count."""
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return f"{datetime.date.today()} · {device}, torch {torch.__version__}"


def publish(table: str, record: bool) -> None:
    """Print the table and, when asked (`--record`), append it to bench/RESULTS.md."""
    print(table)
    if record:
        with open(RESULTS, "a") as f:
            f.write("\n" + table)


class StreamedTable:
    """A table written to bench/RESULTS.md row by row as each is measured (and printed), so a run cut short by a
    timeout keeps every row it finished."""

    def __init__(self, heading: list[str], record: bool):
        self.record = record
        self._write("\n" + "\n".join(heading) + "\n")

    def row(self, line: str) -> None:
        self._write(line + "\n")

    def _write(self, text: str) -> None:
        print(text, end="", flush=True)
        if self.record:
            with open(RESULTS, "a") as f:
                f.write(text)
