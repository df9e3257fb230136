"""Multi-rank runs under torchrun (gloo on CPU) must match one rank with the same global batch."""

import json

import pytest

from tests.conftest import run_module

COMMON = ["train.steps=2", "logging.interval=1", "logging.progress=false", "checkpoint.interval=2",
          "train.batch_size=8", "model.d_model=64", "model.n_layers=2"]


def first_step(run_dir):
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    res = run_module(["-m", "hylo.trainer.train", f"run.dir={run_dir}", *COMMON])
    assert res.returncode == 0, res.stderr[-3000:]
    return first_step(run_dir)


@pytest.mark.parametrize("extra", [["parallel.dp_shard=false"],
                                   # FSDP2 with accumulation, selective checkpointing and a tiled MLP (128 = 48+48+32)
                                   ["parallel.dp_shard=true", "train.micro_batch_size=2",
                                    "train.activation_checkpointing=selective", "model.mlp_tile=48"]],
                         ids=["ddp", "fsdp2-accum-selective-ac-tiled-mlp"])
def test_two_ranks_match_one(single, tmp_path, free_port, extra):
    res = run_module(["-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
                      f"--rdzv_endpoint=127.0.0.1:{free_port}", "-m", "hylo.trainer.train", f"run.dir={tmp_path}",
                      *COMMON, *extra])
    assert res.returncode == 0, res.stderr[-3000:]
    two = first_step(tmp_path)
    assert two["train/loss"] == pytest.approx(single["train/loss"], rel=1e-6)
    assert two["train/grad_norm"] == pytest.approx(single["train/grad_norm"], rel=1e-4)
    assert (tmp_path / "checkpoints" / "step_2" / ".metadata").is_file()


def test_batch_not_divisible_by_ranks(tmp_path, free_port):
    res = run_module(["-m", "torch.distributed.run", "--nproc_per_node=3", "--rdzv_backend=c10d",
                      f"--rdzv_endpoint=127.0.0.1:{free_port}", "-m", "hylo.trainer.train", f"run.dir={tmp_path}",
                      *COMMON])
    assert res.returncode != 0 and "not divisible by the 3 data-parallel ranks" in res.stderr


def test_multi_node_rendezvous_matches_one_rank(single, tmp_path, free_port):
    """Two torchrun agents (`--nnodes 2`, one process each) meeting through the c10d rendezvous, as on two hosts."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    agents = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                          f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port}",
                          "--rdzv_id=hylo-test", "-m", "hylo.trainer.train", f"run.dir={tmp_path}", *COMMON],
                         cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [agent.communicate(timeout=600) for agent in agents]
    for agent, (_, err) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, err[-3000:]
    assert first_step(tmp_path)["train/loss"] == pytest.approx(single["train/loss"], rel=1e-6)
