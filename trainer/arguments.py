"""Every `hylo` command's arguments, and nothing else: torch-free, so `hylo <command> --help` answers in a second
or less (not the 15-20 s of importing the training stack).  trainer/cli.py parses with these and hands the result
to the command's `run(args)`; `python -m hylo.trainer.train` parses with the same `train` parser."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# What each command's --help says above its options (the modules' own docstrings, which --help must not import).
TRAIN_HELP = """Train a hybrid LM:  hylo train [--config NAME|FILE] [--resume [CKPT]] [key=value ...]

Works as is on one process, under `torchrun --standalone --nproc_per_node=N` and under multi-node torchrun.
--config takes a file or a bundled config's name (hybrid_tiny = configs/hybrid_tiny.yaml).  A resume of an existing
run starts from the config its checkpoint was trained with, then applies the overrides given here."""
EVAL_HELP = """Held-out perplexity, overall and by position bucket; MQAR and passkey recall."""
EXPORT_HELP = """One consolidated safetensors file (plus the model config) from a checkpoint, or (--format hf) a
Hugging Face folder: config, weights, tokenizer and a modeling file that runs hylo's own layers."""
GENERATE_HELP = """Decode from a checkpoint through each layer's recurrent cache, reporting tokens/s: greedy, or
sampled (--temperature, --top-k, --top-p, --seed).  --no-cache re-runs the full forward for every token instead
(slow; the reference the cached path must equal)."""
LAUNCH_HELP = """Print and run the right launcher command for a job's shape.

  hylo launch --nodes 1 --gpus-per-node 8 -- --config configs/hybrid_1b.yaml parallel.cp=2
  hylo launch --nodes 4 --gpus-per-node 8 --master-addr node001 -- --config ...     (run on every node)
  hylo launch --nodes 4 --gpus-per-node 8 --slurm -- --config ...                   (inside an sbatch script)
  hylo launch --nodes 2 --gpus-per-node 8 --engine deepspeed --hostfile launch/hostfile.example -- --config ...

On a CPU machine `--gpus-per-node` is the number of processes per node (gloo).  `--dry-run` prints the command
without running it."""
REPORT_HELP = """A one-page summary of a run from its metrics.jsonl: report.png and report.html."""


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hylo train", description=TRAIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the embedded tiny config, configs/tiny.yaml)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="resume: the latest checkpoint in run.dir (no value) or a checkpoint folder "
                             "(--resume=PATH); key=value after --resume stays an override")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    parser.add_argument("--dry-run", action="store_true", help="build everything (data, model, parallelism, "
                        "engine, the checkpoint to resume), read the first batch, then exit without training")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. train.steps=100 model.d_model=256")
    return parser


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """--checkpoint as every command takes it (trainer/checkpointing's find_checkpoint)."""
    parser.add_argument("--checkpoint", required=True, help="a run dir (its newest checkpoint), its checkpoints/ "
                                                            "folder, a step_<N> folder or a hylo export's "
                                                            ".safetensors")


def import_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hylo import", description="A hylo weights file (what hylo export writes, "
                                     "what model.init_from takes) from a local Hugging Face Llama-family folder: the "
                                     "shape from its config, the pattern and layer options from hylo's.")
    parser.add_argument("--hf", required=True, help="a Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="the output .safetensors (a .json config is written beside)")
    parser.add_argument("--config", help="hylo config for the pattern and layer options (default: the embedded one)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. 'model.pattern=[full,tnl]'")
    return parser


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hylo eval", description=EVAL_HELP)
    add_checkpoint_argument(parser)
    parser.add_argument("--task", choices=["ppl", "mqar", "passkey"], default="ppl")
    parser.add_argument("--data", default="auto", help="ppl: held-out data (default: the run's own held-out "
                                                        "documents if it trained with data.val_fraction, else the "
                                                        "bundled corpus's validation split)")
    parser.add_argument("--seq-len", type=int, default=0, help="ppl/mqar: 0 = the training length; longer to "
                                                               "extrapolate")
    parser.add_argument("--batches", type=int, default=4, help="ppl: batches")
    parser.add_argument("--batch-size", type=int, default=4, help="ppl: sequences per batch")
    parser.add_argument("--bucket", type=int, default=0, help="ppl: tokens per position bucket (0 = automatic)")
    parser.add_argument("--pairs", type=int, default=0, help="mqar: key-value pairs (0 = the run's data.mqar)")
    parser.add_argument("--samples", type=int, default=256, help="mqar: sequences scored")
    parser.add_argument("--lengths", default="", help="passkey: comma-separated prompt lengths (default: 1/4, "
                                                      "1/2, 1 and 2 x the training length)")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="passkey: needle depths in [0, 1]")
    parser.add_argument("--trials", type=int, default=4, help="passkey: random keys per (length, depth) cell")
    parser.add_argument("--heatmap", default="", help="passkey: also write the heat-map as this PNG")
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hylo export", description=EXPORT_HELP)
    add_checkpoint_argument(parser)
    parser.add_argument("--out", required=True, help="safetensors: the output file (a .json config is written "
                                                      "beside); hf: the output folder")
    parser.add_argument("--format", choices=["safetensors", "hf"], default="safetensors",
                        help="safetensors: one file for model.init_from; hf: a folder transformers loads "
                             "(AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True))")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--max-shard-size", default="5GB", help="hf: weights above this are sharded with an index")
    return parser


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hylo generate", description=GENERATE_HELP)
    add_checkpoint_argument(parser)
    parser.add_argument("--prompt", default=None, help="the text to continue")
    parser.add_argument("--prompts", default="", help="a file of prompts, one per line (prompts of the same token "
                                                      "length decode as one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens "
                                                                 "whose probability reaches p")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--stream", action="store_true", help="print each token as it is decoded (one prompt)")
    parser.add_argument("--show-tokens", action="store_true", help="also print the token ids (TOKENS ...)")
    parser.add_argument("--no-cache", action="store_true", help="re-run the full forward per token (reference)")
    return parser


def plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hylo plan", description="Per-rank memory of a run (GPU, or --cpu) before "
                                     "launching it, and the settings that would make it fit.")
    parser.add_argument("--config", help="YAML config (default: the embedded tiny config)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs in the job (data parallel x parallel.cp)")
    parser.add_argument("--gpu-mem", type=float, default=None, help="memory of one GPU in GiB (default 80), or "
                                                                    "with --cpu the host memory per rank (default: "
                                                                    "what is free, shared by --gpus ranks)")
    parser.add_argument("--cpu", action="store_true", help="plan a CPU run (fp32, host memory; --gpus = ranks)")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. train.seq_len=131072")
    return parser


def launch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hylo launch", description=LAUNCH_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1, help="processes per node (GPUs, or CPU workers)")
    parser.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", ""))
    parser.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", "29500")))
    parser.add_argument("--run-id", default="hylo", help="rendezvous id shared by the nodes of one job")
    parser.add_argument("--slurm", action="store_true", help="emit the srun + torchrun line for an sbatch script")
    parser.add_argument("--engine", choices=["torch", "deepspeed"], default="torch")
    parser.add_argument("--hostfile", default="", help="--engine deepspeed: DeepSpeed hostfile for multi-node runs")
    parser.add_argument("--dry-run", action="store_true")
    return parser


def report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hylo report", description=REPORT_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory (run.dir) holding metrics.jsonl")
    parser.add_argument("--out", default="", help="where to write report.png/.html (default: the run directory)")
    return parser


def tokenize_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hylo tokenize", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Two jobs:\n  train a byte-level BPE tokenizer:   hylo tokenize --input DATA --vocab-size N "
                    "--output tok.json\n  pre-tokenize a corpus into shards:  hylo tokenize --input DATA --out DIR "
                    "[--tokenizer tok.json]\n(then train with data.path=DIR data.tokenizer=tok.json)")
    parser.add_argument("--input", default="", help="files, folder or glob of text/JSONL/Parquet (default: the "
                                                    "bundled corpus)")
    parser.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"],
                        help="how to read --input (auto: by file suffix)")
    parser.add_argument("--text-field", default="text", help="the column holding the text (JSONL, Parquet)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="tokenizer training: vocabulary size")
    parser.add_argument("--output", default="tokenizer.json", help="tokenizer training: where the tokenizer.json "
                                                                   "goes (not --out, which pre-tokenizes)")
    parser.add_argument("--out", help="pre-tokenize into token shards in this folder (with --tokenizer) instead of "
                                      "training a tokenizer")
    parser.add_argument("--tokenizer", default="", help="with --out: the tokenizer.json to use (default: bundled); "
                                                        "train with the same one as data.tokenizer")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="with --out: tokens per shard file")
    return parser


PARSERS = {"train": train_parser, "tokenize": tokenize_parser, "export": export_parser, "import": import_parser,
           "eval": eval_parser,
           "generate": generate_parser, "launch": launch_parser, "report": report_parser, "plan": plan_parser}


def parse(command: str, argv: list[str]) -> argparse.Namespace:
    """`argv` (what follows `hylo <command>`) parsed as that command takes it.  train and plan: options and
    overrides intermixed; train: `--resume` is folded into the overrides (`args.overrides` ends with
    checkpoint.resume=...); launch: what follows `--` is the training command's, as `args.train_args`."""
    if command == "launch":
        own, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
        args = launch_parser().parse_args(own)
        args.train_args = train_args
        return args
    if command in ("plan", "train", "import"):  # options and overrides in any order: `train a=1 --resume X b=2`
        args = PARSERS[command]().parse_intermixed_args(argv)
    else:
        args = PARSERS[command]().parse_args(argv)
    if command == "train":
        if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
            args.overrides.insert(0, args.resume)  # `--resume train.lr=1e-3`: an override, not a checkpoint path
            args.resume = "auto"
        if args.resume is not None:
            args.overrides.append(f"checkpoint.resume={args.resume}")
    return args
