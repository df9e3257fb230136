"""`hylo launch`: the command lines it prints, and a CPU smoke run through it."""

import json

from launch.launcher import build_command
from tests.conftest import run_module


def test_command_lines():
    args = ["--config", "configs/hybrid_1b.yaml", "parallel.cp=2"]
    assert build_command(1, 8, args) == ["torchrun", "--standalone", "--nproc_per_node=8", "-m", "trainer.train",
                                         *args]
    assert build_command(4, 8, args, master_addr="node001", master_port=29600, run_id="job7") == [
        "torchrun", "--nnodes=4", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=node001:29600",
        "--rdzv_id=job7", "-m", "trainer.train", *args]
    srun = build_command(2, 8, ["run.dir=runs/my run"], slurm=True)
    assert srun[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c"]
    assert srun[5] == ("torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d "
                       "--rdzv_endpoint=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1):29500 "
                       "--rdzv_id=$SLURM_JOB_ID -m trainer.train 'run.dir=runs/my run'")


def test_bad_launches_fail_clearly():
    multi = run_module(["-m", "trainer.cli", "launch", "--nodes", "2", "--dry-run"])
    assert multi.returncode == 2 and "needs --master-addr" in multi.stderr
    ds = run_module(["-m", "trainer.cli", "launch", "--engine", "deepspeed", "--dry-run"])
    assert ds.returncode == 2 and "only the torch engine exists so far" in ds.stderr


def test_cpu_smoke_run_through_hylo_launch(tmp_path):
    res = run_module(["-m", "trainer.cli", "launch", "--gpus-per-node", "2", "--", f"run.dir={tmp_path}",
                      "train.steps=2", "logging.interval=1", "logging.progress=false", "checkpoint.interval=0",
                      "model.d_model=64", "model.n_layers=2", "train.batch_size=4"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("torchrun --standalone --nproc_per_node=2 -m trainer.train")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
