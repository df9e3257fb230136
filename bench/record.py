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
    """Print the table and, unless told not to, append it to bench/RESULTS.md."""
    print(table)
    if record:
        with open(RESULTS, "a") as f:
            f.write("\n" + table)
