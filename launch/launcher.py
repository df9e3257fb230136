"""`hylo launch`: print and run the right launcher command for a job's shape.

  hylo launch --nodes 1 --gpus-per-node 8 -- --config configs/hybrid_1b.yaml parallel.cp=2
  hylo launch --nodes 4 --gpus-per-node 8 --master-addr node001 -- --config ...     (run on every node)
  hylo launch --nodes 4 --gpus-per-node 8 --slurm -- --config ...                   (inside an sbatch script)
  hylo launch --nodes 2 --gpus-per-node 8 --engine deepspeed --hostfile launch/hostfile.example -- --config ...

On a CPU machine `--gpus-per-node` is the number of processes per node (gloo), which is how CI smoke-tests it.
`--dry-run` prints the command without running it.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

from hylo.trainer.checkpointing.deepspeed import require_deepspeed
from hylo.trainer.errors import ConfigError


class HostfileError(ConfigError):
    """A DeepSpeed hostfile that does not parse or does not fit the job."""


def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """DeepSpeed's hostfile format, one `<host> slots=<n>` per line ('#' starts a comment) -> {host: slots}."""
    hosts: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit() or parts[1][6:] == "0":
            raise HostfileError(f"{source} line {number}: '{raw.strip()}' is not '<hostname> slots=<gpus>' "
                                "(e.g. 'node001 slots=8')")
        if parts[0] in hosts:
            raise HostfileError(f"{source} line {number}: host '{parts[0]}' is listed twice")
        hosts[parts[0]] = int(parts[1][6:])
    if not hosts:
        raise HostfileError(f"{source} lists no hosts; write one '<hostname> slots=<gpus>' line per node")
    return hosts


def _with_engine(train_args: list[str], engine: str) -> list[str]:
    return train_args if any(a.startswith("train.engine=") for a in train_args) else [*train_args,
                                                                                      f"train.engine={engine}"]


def build_command(nodes: int, gpus_per_node: int, train_args: list[str], *, master_addr: str = "",
                  master_port: int = 29500, run_id: str = "hylo", slurm: bool = False,
                  engine: str = "torch", hostfile: str = "") -> list[str]:
    """The launcher command line for this job shape.  With `engine="deepspeed"` (and not `slurm`) it is
    DeepSpeed's own launcher; under SLURM torchrun starts the ranks and the trainer runs the DeepSpeed engine."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    if engine not in ("torch", "deepspeed"):
        raise ConfigError(f"--engine {engine} is not one of torch, deepspeed")
    if engine == "deepspeed":
        train_args = _with_engine(train_args, engine)
        if not slurm:
            return _deepspeed_command(nodes, gpus_per_node, train_args, master_addr, master_port, hostfile)
    elif hostfile:
        raise ConfigError("--hostfile is for --engine deepspeed (DeepSpeed's launcher); torchrun needs --master-addr")
    train = ["-m", "hylo.trainer.train", *train_args]
    if slurm:  # one torchrun per node; the shell on each node resolves the head node and the job id
        head = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
        inner = " ".join(["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={gpus_per_node}", "--rdzv_backend=c10d",
                          f"--rdzv_endpoint={head}:{master_port}", "--rdzv_id=$SLURM_JOB_ID",
                          *map(shlex.quote, train)])
        return ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "bash", "-c", inner]
    if nodes == 1:
        return ["torchrun", "--standalone", f"--nproc_per_node={gpus_per_node}", *train]
    if not master_addr:
        raise ConfigError("--nodes > 1 needs --master-addr (the first node's address), or --slurm inside a job")
    return ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={gpus_per_node}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={master_addr}:{master_port}", f"--rdzv_id={run_id}", *train]


def _deepspeed_command(nodes: int, gpus_per_node: int, train_args: list[str], master_addr: str, master_port: int,
                       hostfile: str) -> list[str]:
    # --no_local_rank: hylo reads LOCAL_RANK from the environment; --module: run hylo.trainer.train with python -m
    tail = ["--no_local_rank", "--module", "hylo.trainer.train", *train_args]
    if nodes == 1 and not hostfile:
        return ["deepspeed", f"--num_gpus={gpus_per_node}", f"--master_port={master_port}", *tail]
    if not hostfile:
        raise ConfigError("--engine deepspeed with --nodes > 1 needs --hostfile (lines '<hostname> slots=<gpus>'; "
                         "see launch/hostfile.example)")
    try:
        text = open(hostfile, encoding="utf-8").read()
    except OSError as err:
        raise HostfileError(f"cannot read --hostfile {hostfile}: {err.strerror}") from None
    hosts = parse_hostfile(text, hostfile)
    if len(hosts) < nodes:
        raise HostfileError(f"{hostfile} lists {len(hosts)} host(s) but --nodes {nodes} were asked for")
    short = {h: n for h, n in list(hosts.items())[:nodes] if n < gpus_per_node}
    if short:
        raise HostfileError(f"{hostfile}: {short} have fewer slots than --gpus-per-node {gpus_per_node}")
    head = master_addr or next(iter(hosts))
    return ["deepspeed", f"--hostfile={hostfile}", f"--num_nodes={nodes}", f"--num_gpus={gpus_per_node}",
            f"--master_addr={head}", f"--master_port={master_port}", *tail]


def run(args) -> int:
    """`hylo launch` (arguments: trainer/arguments.py; `args.train_args`: what followed `--`)."""
    cmd = build_command(args.nodes, args.gpus_per_node, args.train_args, master_addr=args.master_addr,
                        master_port=args.master_port, run_id=args.run_id, slurm=args.slurm, engine=args.engine,
                        hostfile=args.hostfile)
    line = " ".join(cmd[:-1]) + " " + shlex.quote(cmd[-1]) if args.slurm else shlex.join(cmd)
    print(line, flush=True)
    if args.dry_run:
        return 0
    if cmd[0] == "torchrun":  # the interpreter running hylo, so the same environment
        cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
    elif cmd[0] == "deepspeed":
        require_deepspeed()
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *cmd[1:]]
    return subprocess.call(cmd)
