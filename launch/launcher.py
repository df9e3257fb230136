"""`hylo launch`: print and run the right launcher command for a job's shape.

  hylo launch --nodes 1 --gpus-per-node 8 -- --config configs/hybrid_1b.yaml parallel.cp=2
  hylo launch --nodes 4 --gpus-per-node 8 --master-addr node001 -- --config ...     (run on every node)
  hylo launch --nodes 4 --gpus-per-node 8 --slurm -- --config ...                   (inside an sbatch script)

On a CPU machine `--gpus-per-node` is the number of processes per node (gloo), which is how CI smoke-tests it.
`--dry-run` prints the command without running it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys


def build_command(nodes: int, gpus_per_node: int, train_args: list[str], *, master_addr: str = "",
                  master_port: int = 29500, run_id: str = "hylo", slurm: bool = False,
                  engine: str = "torch") -> list[str]:
    if engine != "torch":
        raise ValueError(f"--engine {engine}: only the torch engine exists so far (the DeepSpeed engine is open "
                         "work); launch with --engine torch")
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node must be >= 1")
    train = ["-m", "trainer.train", *train_args]
    if slurm:  # one torchrun per node; the shell on each node resolves the head node and the job id
        head = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
        inner = " ".join(["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={gpus_per_node}", "--rdzv_backend=c10d",
                          f"--rdzv_endpoint={head}:{master_port}", "--rdzv_id=$SLURM_JOB_ID",
                          *map(shlex.quote, train)])
        return ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "bash", "-c", inner]
    if nodes == 1:
        return ["torchrun", "--standalone", f"--nproc_per_node={gpus_per_node}", *train]
    if not master_addr:
        raise ValueError("--nodes > 1 needs --master-addr (the first node's address), or --slurm inside a job")
    return ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={gpus_per_node}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={master_addr}:{master_port}", f"--rdzv_id={run_id}", *train]


def launch_main(argv: list[str]) -> int:
    if "--" in argv:
        split = argv.index("--")
        argv, train_args = argv[:split], argv[split + 1:]
    else:
        train_args = []
    parser = argparse.ArgumentParser(prog="hylo launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1, help="processes per node (GPUs, or CPU workers)")
    parser.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", ""))
    parser.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", "29500")))
    parser.add_argument("--run-id", default="hylo", help="rendezvous id shared by the nodes of one job")
    parser.add_argument("--slurm", action="store_true", help="emit the srun + torchrun line for an sbatch script")
    parser.add_argument("--engine", choices=["torch", "deepspeed"], default="torch")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    try:
        cmd = build_command(args.nodes, args.gpus_per_node, train_args, master_addr=args.master_addr,
                            master_port=args.master_port, run_id=args.run_id, slurm=args.slurm, engine=args.engine)
    except ValueError as err:
        print(f"[hylo] error: {err}", file=sys.stderr)
        return 2
    line = " ".join(cmd[:-1]) + " " + shlex.quote(cmd[-1]) if args.slurm else shlex.join(cmd)
    print(line, flush=True)
    if args.dry_run:
        return 0
    if cmd[0] == "torchrun":  # the interpreter running hylo, so the same environment
        cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
    return subprocess.call(cmd)
