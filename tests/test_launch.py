"""`hylo launch`: the command lines it prints, and a CPU smoke run through it."""

import json

import pytest

from hylo.launch.launcher import HostfileError, build_command, parse_hostfile
from tests.conftest import run_module


def test_command_lines():
    args = ["--config", "configs/hybrid_1b.yaml", "parallel.cp=2"]
    assert build_command(1, 8, args) == ["torchrun", "--standalone", "--nproc_per_node=8", "-m", "hylo.trainer.train",
                                         *args]
    assert build_command(4, 8, args, master_addr="node001", master_port=29600, run_id="job7") == [
        "torchrun", "--nnodes=4", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=node001:29600",
        "--rdzv_id=job7", "-m", "hylo.trainer.train", *args]
    srun = build_command(2, 8, ["run.dir=runs/my run"], slurm=True)
    assert srun[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c"]
    assert srun[5] == ("torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d "
                       "--rdzv_endpoint=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1):29500 "
                       "--rdzv_id=$SLURM_JOB_ID -m hylo.trainer.train 'run.dir=runs/my run'")


def test_bad_launches_fail_clearly():
    multi = run_module(["-m", "hylo.trainer.cli", "launch", "--nodes", "2", "--dry-run"])
    assert multi.returncode == 2 and "needs --master-addr" in multi.stderr
    ds = run_module(["-m", "hylo.trainer.cli", "launch", "--engine", "deepspeed", "--nodes", "2", "--dry-run"])
    assert ds.returncode == 2 and "needs --hostfile" in ds.stderr


def test_deepspeed_command_lines(tmp_path):
    assert build_command(1, 8, ["--config", "c.yaml"], engine="deepspeed") == [
        "deepspeed", "--num_gpus=8", "--master_port=29500", "--no_local_rank", "--module", "hylo.trainer.train",
        "--config", "c.yaml", "train.engine=deepspeed"]
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode001 slots=8\n\nnode002 slots=8  # spare\n")
    assert build_command(2, 8, ["train.engine=deepspeed"], engine="deepspeed", hostfile=str(hostfile)) == [
        "deepspeed", f"--hostfile={hostfile}", "--num_nodes=2", "--num_gpus=8", "--master_addr=node001",
        "--master_port=29500", "--no_local_rank", "--module", "hylo.trainer.train", "train.engine=deepspeed"]
    srun = build_command(2, 4, [], slurm=True, engine="deepspeed")  # torchrun starts ranks; the engine is DeepSpeed
    assert srun[5].startswith("torchrun --nnodes=2 --nproc_per_node=4") and srun[5].endswith("train.engine=deepspeed")


@pytest.mark.parametrize("text,message", [
    ("node001 8", "is not '<hostname> slots=<gpus>'"),
    ("node001 slots=x", "is not '<hostname> slots=<gpus>'"),
    ("node001 slots=4\nnode001 slots=4", "listed twice"),
    ("# nothing\n", "lists no hosts"),
])
def test_bad_hostfiles_are_explained(text, message):
    with pytest.raises(HostfileError, match=message):
        parse_hostfile(text)


def test_hostfile_must_fit_the_job(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=8\nb slots=4\n")
    with pytest.raises(HostfileError, match="lists 2 host"):
        build_command(3, 4, [], engine="deepspeed", hostfile=str(hostfile))
    with pytest.raises(HostfileError, match="fewer slots"):
        build_command(2, 8, [], engine="deepspeed", hostfile=str(hostfile))
    with pytest.raises(HostfileError, match="cannot read"):
        build_command(2, 8, [], engine="deepspeed", hostfile=str(tmp_path / "missing"))


def test_cpu_smoke_run_through_hylo_launch(tmp_path):
    res = run_module(["-m", "hylo.trainer.cli", "launch", "--gpus-per-node", "2", "--", f"run.dir={tmp_path}",
                      "train.steps=2", "logging.interval=1", "logging.progress=false", "checkpoint.interval=0",
                      "model.d_model=64", "model.n_layers=2", "train.batch_size=4"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("torchrun --standalone --nproc_per_node=2 -m hylo.trainer.train")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]


def test_a_lost_peer_is_one_line(monkeypatch):
    """What gloo raises on the surviving rank when another rank is killed becomes one line (exit 1); other errors,
    and any error of a one-process run, stay themselves."""
    import torch.distributed as dist

    from hylo.trainer.errors import PeerLost
    from hylo.trainer.runtime.distributed import peer_lost

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:41234: "
                        "Connection reset by peer")
    assert peer_lost(gloo) is None  # one process: no peers to lose
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    lost = peer_lost(gloo)
    assert isinstance(lost, PeerLost) and lost.exit_code == 1
    assert "rank 1 lost contact with the job (Connection reset by peer): another rank died" in str(lost)
    assert isinstance(peer_lost(dist.DistNetworkError("Broken pipe")), PeerLost)
    assert peer_lost(RuntimeError("shape mismatch")) is None and peer_lost(ValueError("Broken pipe")) is None


def test_cpu_threads_leave_the_cores_other_work_uses(monkeypatch):
    """Decided from what runs now (runnable tasks, this process's own threads aside), not the 1-minute load
    average, which lags: a run started right after other work ended must take every core."""
    import os

    from hylo.trainer.runtime import distributed
    from hylo.trainer.runtime.distributed import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(distributed, "_own_running", lambda: 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (2.4, 2.0, 2.0))  # a pip install that just ended
    monkeypatch.setattr(distributed, "_runnable", lambda: 1)  # only this process runs now
    assert cpu_threads()[0] == 2  # an idle 2-core box: both cores
    monkeypatch.setattr(distributed, "_runnable", lambda: 2)
    assert cpu_threads()[0] == 1  # another job on it: one thread, not two fighting a third
    samples = iter([3, 1, 2])  # short-lived tasks in some samples only: the least is what stays
    monkeypatch.setattr(distributed, "_runnable", lambda: next(samples))
    assert cpu_threads()[0] == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(distributed, "_runnable", lambda: 4)
    assert cpu_threads()[0] == 4  # 16 cores for 4 ranks, whose own load is not other work
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", "2")  # DeepSpeed's launcher
    monkeypatch.setattr(distributed, "_runnable", lambda: 2)
    assert cpu_threads() == (8, "16 cores for 2 rank(s), 0 other task(s) running")
    assert cpu_threads(3) == (3, "train.cpu_threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads()[1] == "OMP_NUM_THREADS"


def test_cpu_threads_are_revisited_while_training(monkeypatch):
    import os
    from types import SimpleNamespace

    import torch

    from hylo.trainer.callbacks.cpu_threads import CpuThreads
    from hylo.trainer.runtime import distributed

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    said = []
    trainer = SimpleNamespace(device=torch.device("cpu"), cfg=SimpleNamespace(train=SimpleNamespace(cpu_threads=0)),
                              is_log_step=lambda: True, say=said.append)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # chosen at start, beside another job
        monitor = CpuThreads(seconds=0)
        monitor.on_train_start(trainer)
        monkeypatch.setattr(distributed, "_runnable", lambda: 2)  # the other job still runs beside this rank
        monkeypatch.setattr(distributed, "_own_running", lambda: 1)
        monitor.on_step_end(trainer, None)
        assert torch.get_num_threads() == 1 and not said
        monkeypatch.setattr(distributed, "_runnable", lambda: 1)  # it ended
        monitor.on_step_end(trainer, None)
        assert torch.get_num_threads() == 2 and "now 2 intra-op thread(s)" in said[0]
        monkeypatch.setattr(distributed, "_runnable", lambda: 2)  # this rank's own two threads are not other work
        monkeypatch.setattr(distributed, "_own_running", lambda: 2)
        monitor.on_step_end(trainer, None)
        assert torch.get_num_threads() == 2 and len(said) == 1
        trainer.cfg.train.cpu_threads = 1  # a fixed choice is left alone
        monitor.on_train_start(trainer)
        assert not monitor.active
    finally:
        torch.set_num_threads(before)
