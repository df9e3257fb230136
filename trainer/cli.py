"""The `hylo` console script: `hylo train ...`, `hylo tokenize ...`."""

from __future__ import annotations

import argparse
import importlib
import sys

from trainer.errors import run_command


def tokenize_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hylo tokenize", description="Train a byte-level BPE tokenizer.")
    parser.add_argument("--input", default="", help="files, folder or glob (default: the bundled corpus)")
    parser.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"])
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--output", default="tokenizer.json")
    parser.add_argument("--out", help="pre-tokenize into token shards in this folder (with --tokenizer) instead of "
                                      "training a tokenizer")
    parser.add_argument("--tokenizer", default="", help="with --out: tokenizer.json to use (default: bundled)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    args = parser.parse_args(argv)

    from trainer.config import DataConfig
    from trainer.data import DocumentStream
    from trainer.tokenizer import train_bpe

    stream = DocumentStream(DataConfig(path=args.input, format=args.format, text_field=args.text_field), seed=0)

    def one_epoch():
        for epoch, _, text in stream.iterate():
            if epoch > 0:
                return
            yield text

    if args.out:
        from pathlib import Path

        from trainer.shards import write_shards
        from trainer.tokenizer import load_tokenizer

        index = write_shards(one_epoch(), load_tokenizer(args.tokenizer), Path(args.out), args.shard_tokens)
        print(f"[hylo] wrote {index['total_tokens']:,} tokens in {len(index['shards'])} shard(s) to {args.out}; "
              f"train with data.path={args.out}")
        return 0
    tok = train_bpe(one_epoch(), args.vocab_size, args.output)
    print(f"[hylo] wrote {args.output} ({tok.get_vocab_size()} tokens)")
    if tok.get_vocab_size() < args.vocab_size:
        print(f"[hylo] note: asked for --vocab-size {args.vocab_size}, but the input only supports "
              f"{tok.get_vocab_size()} tokens (too little text for more merges); give more text for a larger "
              "vocabulary", flush=True)
    return 0


# name -> (module, function); a subcommand's module is imported only when it runs (`hylo launch` need not import
# the training stack).
COMMANDS = {"train": ("trainer.train", "main"), "tokenize": (__name__, "tokenize_main"),
            "export": ("trainer.export", "export_main"), "eval": ("trainer.evaluate", "eval_main"),
            "generate": ("trainer.generate", "generate_main"), "launch": ("launch.launcher", "launch_main"),
            "report": ("trainer.report", "report_main"), "plan": ("trainer.plan", "main")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hylo {train,plan,tokenize,export,eval,generate,launch,report} [args]\n"
              "  train     train a model (hylo train --help)\n"
              "  plan      per-rank GPU memory of a config before launching it, and what would fit (hylo plan "
              "--help)\n"
              "  tokenize  train a byte-level BPE tokenizer, or pre-tokenize a corpus (hylo tokenize --help)\n"
              "  export    a checkpoint as one safetensors file (hylo export --help)\n"
              "  eval      perplexity by position, MQAR and passkey recall (hylo eval --help)\n"
              "  generate  decode from a checkpoint with the recurrent caches (hylo generate --help)\n"
              "  launch    print and run the torchrun / deepspeed / srun command for N nodes x G GPUs\n"
              "  report    a PNG/HTML summary of a run directory (hylo report --help)\n"
              "exit codes: 0 done, 2 refused (config, arguments, data, a checkpoint to read), 1 failed while running")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hylo: unknown command '{command}'; choose from {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    module, function = COMMANDS[command]
    return run_command(getattr(importlib.import_module(module), function), rest)


if __name__ == "__main__":
    sys.exit(main())
