"""What the start-up data checks cost next to what a run already did before them.

  python bench/bench_startup_checks.py [--files N] [--record]

A text corpus is checked before the run dir is created: every file's first 4 KB is read to refuse binary files
(`DocumentStream.check_readable`), beside the provenance record that already stats every file
(`data_provenance`).  Timed on the bundled corpus and on a synthetic corpus of N small files (cold-ish: the files
were just written, so they sit in the page cache, as a corpus read by the previous run does).  Also the cost of
verifying a step folder's DCP `.metadata` with hylo's reader next to verifying its checksum manifest.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, publish  # noqa: E402


def best_of(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def corpus_row(name: str, path: str) -> str:
    from hylo.trainer.config import DataConfig
    from hylo.trainer.data.provenance import data_provenance
    from hylo.trainer.data.sources import DocumentStream
    from hylo.trainer.data.tokenizer import load_tokenizer

    cfg, tok = DataConfig(path=path), load_tokenizer()
    stream = DocumentStream(cfg, seed=0)
    sniff = best_of(lambda: stream._binary_file())
    provenance = best_of(lambda: data_provenance(cfg, tok))
    return (f"| {name} | {len(stream.source):,} | {sniff * 1e3:.0f} | {provenance * 1e3:.0f} | "
            f"{sniff / provenance:.2f}x |")


def metadata_row() -> str:
    import torch

    from hylo.models.lm import HybridLM
    from hylo.trainer.checkpointing.dcp import DCPCheckpointer
    from hylo.trainer.checkpointing.integrity import read_dcp_metadata, verify_manifest
    from hylo.trainer.checkpointing.step_folder import MARKER
    from hylo.trainer.config import load_config

    cfg = load_config(None, ["model.vocab_size=4096"])
    model = HybridLM(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    with tempfile.TemporaryDirectory() as root:
        DCPCheckpointer(Path(root)).save(1, model, optimizer, {"step": 1, "data": {}, "scheduler": {}})
        folder = Path(root) / "step_1"
        metadata = best_of(lambda: read_dcp_metadata(folder), reps=5)
        manifest = best_of(lambda: verify_manifest(folder, skip={MARKER}), reps=5)
    return (f"| tiny.yaml step folder | `.metadata` read {metadata * 1e3:.1f} ms | manifest check "
            f"{manifest * 1e3:.1f} ms | {metadata / manifest:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    rows = [corpus_row("bundled corpus (stdlib .py)", "")]
    with tempfile.TemporaryDirectory() as root:
        for i in range(args.files):
            (Path(root) / f"doc{i:06d}.txt").write_text(f"document {i}\n" + "a line of plain text\n" * 200)
        rows.append(corpus_row(f"{args.files:,} files of 4 KB", root))
    table = "\n".join([
        f"### Start-up checks (issue 32): binary-file sniff and DCP metadata verification — {machine()}",
        "",
        "| corpus | files | sniff first 4 KB (ms) | provenance stat (ms) | sniff / provenance |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        "| checkpoint | hylo's metadata reader | checksum manifest | reader / manifest |",
        "|---|---:|---:|---:|",
        metadata_row(),
        "",
    ])
    publish(table, record=args.record)


if __name__ == "__main__":
    main()
