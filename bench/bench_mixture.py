"""Data-mixture loader throughput: three weighted sources against one, streaming and on token shards.

  python bench/bench_mixture.py [--steps 60] [--record]

Streaming: the bundled corpus as one source (data.path) and as a three-source mixture (0.7/0.2/0.1, each source
its own shuffle of the same files), seq_len 1024, global batch 16, one rank.  Token shards: the same shards as one
source and as three, seen from rank 0 of 8 simulated ranks (each rank reads its own rows; the others are
skipped).  Reported as global tokens/s of the loader alone (no model), each after a warm-up step; target (issue
30): the mixture within 10% of one source.
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


def tokens_per_second(cfg, tokenizer, steps: int, seq_len: int, batch: int, rank: int = 0, world: int = 1) -> float:
    from hylo.trainer.data.loader import DataLoader

    loader = DataLoader(cfg, tokenizer, seq_len=seq_len, global_batch=batch, micro_batch=batch // world, rank=rank,
                        world=world, seed=0)
    for _ in range(5):  # warm-up: opens every source, fills the first documents
        next(loader)
    start = time.perf_counter()
    for _ in range(steps):
        next(loader)
    elapsed = time.perf_counter() - start
    loader.close()
    return steps * batch * seq_len / elapsed


def eos_scan_seconds(tok, n_tokens: int) -> float:
    """Seconds to cut n_tokens of shards into documents (ShardDocuments), documents of ~1K tokens."""
    import json

    import numpy as np

    from hylo.trainer.data.shards import FORMAT, INDEX, ShardDocuments, TokenShards, tokenizer_fingerprint
    from hylo.trainer.data.tokenizer import EOS

    eos = tok.token_to_id(EOS)
    with tempfile.TemporaryDirectory() as root:
        tokens = np.random.default_rng(0).integers(10, 1000, n_tokens, dtype=np.uint16)
        tokens[1023::1024] = eos
        tokens.tofile(Path(root) / "tokens_00000.bin")
        (Path(root) / INDEX).write_text(json.dumps({
            "format": FORMAT, "dtype": "uint16", "eos": eos, "vocab_size": tok.get_vocab_size(),
            "tokenizer": tokenizer_fingerprint(tok), "total_tokens": n_tokens,
            "shards": [{"file": "tokens_00000.bin", "tokens": n_tokens, "crc32": 0}]}))
        shards = TokenShards(root, tok, verify=False)
        start = time.perf_counter()
        docs = ShardDocuments(shards, eos, seed=0)
        elapsed = time.perf_counter() - start
        assert len(docs) == -(-n_tokens // 1024)
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    from hylo.trainer.config import DataConfig, SourceConfig, UpsampleConfig
    from hylo.trainer.data.shards import write_shards
    from hylo.trainer.data.sources import bundled_corpus_files
    from hylo.trainer.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    weights = (0.7, 0.2, 0.1)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        # three sources of the same make (the bundled corpus's files dealt round-robin into three folders), so the
        # ratio measures the mixture, not which documents a shuffle happened to put first
        files = bundled_corpus_files()
        for i in range(3):
            (Path(root) / f"src{i}").mkdir()
        for j, f in enumerate(files):
            (Path(root) / f"src{j % 3}" / f"{j:05d}.py").symlink_to(f)
        one = DataConfig(path=str(Path(root) / "src0"), prefetch=0)
        three = DataConfig(prefetch=0, sources=[SourceConfig(name=f"s{i}", path=str(Path(root) / f"src{i}"),
                                                             weight=w) for i, w in enumerate(weights)])
        a = tokens_per_second(one, tok, args.steps, 1024, 16)
        b = tokens_per_second(three, tok, args.steps, 1024, 16)
    rows.append(f"| streaming (stdlib files, three alike folders), 1 rank | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |")
    with tempfile.TemporaryDirectory() as root:
        texts = [open(f, encoding="utf-8", errors="replace").read() for f in bundled_corpus_files()[:400]]
        for i in range(3):
            write_shards(texts, tok, Path(root) / f"shards{i}", shard_tokens=500_000)
        one = DataConfig(path=str(Path(root) / "shards0"), prefetch=0)
        three = DataConfig(prefetch=0, sources=[SourceConfig(name=f"s{i}", path=str(Path(root) / f"shards{i}"),
                                                             weight=w) for i, w in enumerate(weights)])
        a = tokens_per_second(one, tok, args.steps * 4, 1024, 32, rank=0, world=8)
        b = tokens_per_second(three, tok, args.steps * 4, 1024, 32, rank=0, world=8)
        rows.append(f"| token shards, rank 0 of 8 | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |")
        # the same three shard sources shaping their documents (read as documents, cut at EOS)
        shaped = DataConfig(prefetch=0, sources=[
            SourceConfig(name=f"s{i}", path=str(Path(root) / f"shards{i}"), weight=w, min_doc_tokens=64,
                         upsample_long=UpsampleConfig(min_tokens=2048, factor=2)) for i, w in enumerate(weights)])
        c = tokens_per_second(shaped, tok, args.steps * 4, 1024, 32, rank=0, world=8)
        rows.append(f"| token shards shaping documents (min_doc_tokens 64, upsample 2x >= 2,048), rank 0 of 8 | "
                    f"{a:,.0f} | {c:,.0f} | {c / a:.2f}x |")
    scan = eos_scan_seconds(tok, 100_000_000)
    rows.append(f"| opening a shaping shard source: EOS scan of 100M tokens (uint16, one file) | | {scan:.2f} s | |")
    table = "\n".join([
        f"### bench_mixture: loader throughput, one source vs a 0.7/0.2/0.1 mixture of three — {machine()}", "",
        "| data | one source (global tokens/s) | three sources | mixture / one |", "|---|---:|---:|---:|",
        *rows, "", "Target (issue 30): the mixture within 10% of one source. Token shards skip the other ranks' "
        "rows in one index step per source where the round robin has a short period (0.7/0.2/0.1: 10).", ""])
    publish(table, record=args.record)


if __name__ == "__main__":
    main()
