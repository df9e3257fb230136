"""`hylo tokenize`: train a byte-level BPE tokenizer on a corpus, or pre-tokenize a corpus into token shards."""

from __future__ import annotations

import argparse
import re

from hylo.trainer.errors import DataError

# The data readers name the training settings; here the same things are this command's options.
OPTIONS = {"data.path": "--input", "data.format": "--format", "data.text_field": "--text-field"}


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except DataError as err:
        raise DataError(re.sub("|".join(map(re.escape, OPTIONS)), lambda m: OPTIONS[m[0]], str(err))) from None


def _run(args: argparse.Namespace) -> int:
    from hylo.trainer.config import DataConfig
    from hylo.trainer.data.sources import DocumentStream
    from hylo.trainer.data.tokenizer import train_bpe

    stream = DocumentStream(DataConfig(path=args.input, format=args.format, text_field=args.text_field), seed=0)

    def one_epoch():
        for epoch, _, text in stream.iterate():
            if epoch > 0:
                return
            yield text

    if args.out:
        from pathlib import Path

        from hylo.trainer.data.shards import write_shards
        from hylo.trainer.data.tokenizer import load_tokenizer

        index = write_shards(one_epoch(), load_tokenizer(args.tokenizer), Path(args.out), args.shard_tokens)
        print(f"[hylo] wrote {index['total_tokens']:,} tokens in {len(index['shards'])} shard(s) to {args.out}; "
              f"train with data.path={args.out}" + (f" data.tokenizer={args.tokenizer}" if args.tokenizer else ""))
        return 0
    tok = train_bpe(one_epoch(), args.vocab_size, args.output)
    print(f"[hylo] wrote {args.output} ({tok.get_vocab_size()} tokens)")
    if tok.get_vocab_size() < args.vocab_size:
        print(f"[hylo] note: asked for --vocab-size {args.vocab_size}, but the input only supports "
              f"{tok.get_vocab_size()} tokens (too little text for more merges); give more text for a larger "
              "vocabulary", flush=True)
    return 0
