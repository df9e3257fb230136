"""The `hylo` console script: `hylo train ...`, `hylo tokenize ...`, and every command's arguments.

The CLI parses (with trainer/arguments.py's parsers, torch-free, so `--help` answers at once) and dispatches: each
command's module is imported only when it runs and is handed the parsed arguments as `run(args)`; no command
module reaches back up to this one.
"""

from __future__ import annotations

import importlib
import sys

from hylo.trainer.arguments import PARSERS, parse
from hylo.trainer.errors import run_command
from hylo.trainer.runtime import launcher_watch  # noqa: F401  (records the torchrun agent before torch loads)

# command -> the module that runs it (`run(args)`), imported only when that command runs: `hylo launch` need not
# import the training stack.
COMMANDS = {"train": "hylo.trainer.train", "plan": "hylo.trainer.memory_plan", "tokenize": "hylo.trainer.data.tokenize",
            "export": "hylo.trainer.checkpointing.export", "eval": "hylo.trainer.evaluation.evaluate",
            "generate": "hylo.trainer.evaluation.generate", "launch": "hylo.launch.launcher",
            "report": "hylo.trainer.evaluation.report", "import": "hylo.trainer.checkpointing.hf_import"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hylo {train,plan,tokenize,export,import,eval,generate,launch,report} [args]\n"
              "  train     train a model (hylo train --help)\n"
              "  plan      per-rank GPU memory of a config before launching it, and what would fit (hylo plan "
              "--help)\n"
              "  tokenize  train a byte-level BPE tokenizer, or pre-tokenize a corpus (hylo tokenize --help)\n"
              "  export    a checkpoint as one safetensors file or a Hugging Face folder (hylo export --help)\n"
              "  import    a hylo weights file from a Hugging Face Llama-family folder (hylo import --help)\n"
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
    own = rest[: rest.index("--")] if "--" in rest else rest  # hylo launch ... -- <train args>
    if "-h" in own or "--help" in own:  # answered here, before the command's module (and torch) is imported
        PARSERS[command]().print_help()
        return 0
    args = parse(command, rest)
    return run_command(importlib.import_module(COMMANDS[command]).run, args)


if __name__ == "__main__":
    sys.exit(main())
