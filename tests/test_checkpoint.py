"""Checkpoints that survive: bit-exact resume, crashes under torchrun restarts, saves killed halfway, resharding
with token shards, pruning, async saves, preemption signals, non-finite steps, corrupt files, export."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch

from hylo.trainer.config import DataConfig
from hylo.trainer.data.loader import DataLoader
from hylo.trainer.data.shards import TokenShards, write_shards
from hylo.trainer.data.sources import bundled_corpus_files
from hylo.trainer.data.tokenizer import load_tokenizer
from hylo.trainer.errors import DataError
from tests.conftest import ROOT, run_module, subprocess_env

SMALL = ["model.d_model=64", "model.n_layers=2", "train.batch_size=8", "train.seq_len=64", "logging.interval=1",
         "logging.progress=false", "train.deterministic=true", "logging.sink_interval=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    texts = (open(f, encoding="utf-8", errors="replace").read() for f in bundled_corpus_files()[:120])
    write_shards(texts, load_tokenizer(), out, shard_tokens=200_000)
    return out


def losses(run_dir):
    """step -> loss, the last value logged for each step (a restarted run logs some steps twice)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def torchrun(n, port, args, extra_env=None, restarts=0):
    """Train on n ranks; with HYLO_FAULT in extra_env through the fault-injecting entry (tests/fault_run.py)."""
    env = {**subprocess_env(), **(extra_env or {})}
    module = "tests.fault_run" if "HYLO_FAULT" in (extra_env or {}) else "hylo.trainer.train"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{port}", f"--max-restarts={restarts}", "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards):
    """20 uninterrupted steps on 2 ranks: the reference every interrupted run must reproduce."""
    run_dir = tmp_path_factory.mktemp("straight")
    port = 29000 + os.getpid() % 1000
    res = torchrun(2, port, [f"run.dir={run_dir}", f"data.path={shards}", "train.steps=20",
                             "checkpoint.interval=0", *SMALL])
    assert res.returncode == 0, res.stderr[-3000:]
    return losses(run_dir)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_resume_is_bit_exact(straight, shards, tmp_path, free_port, async_save):
    args = [f"run.dir={tmp_path}", f"data.path={shards}", "checkpoint.interval=10", f"checkpoint.async={async_save}",
            *SMALL]
    first = torchrun(2, free_port, [*args, "train.steps=10"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(2, free_port, [*args, "train.steps=20"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout
    assert losses(tmp_path) == straight  # exact equality, every step


def test_killed_rank_restarts_and_matches(straight, shards, tmp_path, free_port):
    res = torchrun(2, free_port, [f"run.dir={tmp_path}", f"data.path={shards}", "train.steps=20",
                                  "checkpoint.interval=5", *SMALL], {"HYLO_FAULT": "kill:13:1"}, restarts=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout and "step_10" in res.stdout
    assert losses(tmp_path) == straight


def test_save_killed_halfway_is_ignored(shards, tmp_path):
    args = ["-m", "tests.fault_run", f"run.dir={tmp_path}", f"data.path={shards}", "train.steps=12",
            "checkpoint.interval=5", *SMALL]
    env = {**subprocess_env(), "HYLO_FAULT": "kill_in_save:10"}
    dead = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert dead.returncode == -signal.SIGKILL
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "step_5" / "COMPLETE").is_file() and (ckpts / "step_10.tmp").is_dir()
    again = run_module(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "step_5" in again.stdout
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_10", "step_12", "step_5"]


def test_token_shards_reshard_exactly(shards):
    """Save at 2 ranks, resume at 1 and at 4: the sequences consumed are exactly the uninterrupted run's."""
    tok = load_tokenizer()
    cfg = DataConfig(path=str(shards), prefetch=0)

    def consume(loaders, steps):
        seen = []
        for _ in range(steps):
            for loader in loaders:
                seen += [tuple(row.tolist()) for row in next(loader).reshape(-1, 65)]
        return seen

    def loaders(world, state=None):
        out = [DataLoader(cfg, tok, seq_len=64, global_batch=8, micro_batch=8 // world, rank=r, world=world, seed=3)
               for r in range(world)]
        for loader in out:
            if state:
                loader.load_state_dict(state)
        return out

    reference = consume(loaders(1), 30)
    first = loaders(2)
    before = consume(first, 10)
    state = first[0].state_dict()
    assert state == first[1].state_dict()
    for world in (1, 4):
        after = consume(loaders(world, state), 20)
        assert Counter(before + after) == Counter(reference)
        assert before + after == reference  # even the order


def test_token_shards_detect_damage(shards, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    last = sorted(bad.glob("tokens_*.bin"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[:-10])
    with pytest.raises(DataError, match="truncated or replaced"):
        TokenShards(bad)
    last.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    with pytest.raises(DataError, match="fails its CRC32 check"):
        TokenShards(bad)
    res = run_module(["-m", "hylo.trainer.train", f"data.path={bad}", f"run.dir={tmp_path / 'run'}", *SMALL])
    assert res.returncode == 2 and "CRC32" in res.stderr


def test_keep_last_prunes_and_corrupt_checkpoints_fail_clearly(shards, tmp_path):
    args = ["-m", "hylo.trainer.train", f"run.dir={tmp_path}", f"data.path={shards}", "train.steps=20",
            "checkpoint.interval=5", "checkpoint.keep_last=2", *SMALL]
    res = run_module(args)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_15", "step_20"]
    (ckpts / "step_20" / "COMPLETE").unlink()  # as if cut off: ignored by auto, refused when named
    named = run_module([*args, "train.steps=25", f"checkpoint.resume={ckpts / 'step_20'}"])
    assert named.returncode == 2 and "is incomplete" in named.stderr
    shard = next((ckpts / "step_15").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    broken = run_module([*args, "train.steps=25"])
    assert broken.returncode == 2 and "step_15" in broken.stderr and "corrupt" in broken.stderr


def test_preemption_saves_and_exits_zero(shards, tmp_path):
    args = ["-m", "hylo.trainer.train", f"run.dir={tmp_path}", f"data.path={shards}", "train.steps=100000",
            "checkpoint.interval=0", *SMALL]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted: saved step" in out
    step = max(losses(tmp_path))
    assert (tmp_path / "checkpoints" / f"step_{step}" / "COMPLETE").is_file()


def test_non_finite_steps(shards, tmp_path):
    base = ["-m", "tests.fault_run", f"data.path={shards}", "train.steps=6", "checkpoint.interval=2", *SMALL]
    env = {**subprocess_env(), "HYLO_FAULT": "nan:5"}
    stop = subprocess.run([sys.executable, *base, f"run.dir={tmp_path / 'stop'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert stop.returncode == 1 and "non-finite gradient norm at step 5" in stop.stderr
    assert sorted(p.name for p in (tmp_path / "stop" / "checkpoints").iterdir()) == ["step_2", "step_4"]
    skip = subprocess.run([sys.executable, *base, f"run.dir={tmp_path / 'skip'}", "train.nan_policy=skip"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert skip.returncode == 0, skip.stderr[-2000:]
    state = json.loads((tmp_path / "skip" / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1 and all(np.isfinite(v) for v in losses(tmp_path / "skip").values())


def test_export_and_init_from(shards, tmp_path):
    run = tmp_path / "run"
    res = run_module(["-m", "hylo.trainer.train", f"run.dir={run}", f"data.path={shards}", "train.steps=3",
                      "checkpoint.interval=3", "schedule.warmup_steps=0", *SMALL])
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "model.safetensors"
    exp = run_module(["-m", "hylo.trainer.cli", "export", "--checkpoint", str(run / "checkpoints" / "step_3"),
                      "--out", str(out), "--dtype", "fp32"])
    assert exp.returncode == 0, exp.stderr[-2000:]
    assert out.stat().st_mode & 0o044 == 0o044  # readable by group and others (safetensors writes 0600)
    from safetensors.torch import load_file

    from hylo.models.lm import HybridLM
    from hylo.trainer.checkpointing import load_weights
    from hylo.trainer.checkpointing.export import run_config_for

    cfg = run_config_for(run / "checkpoints" / "step_3")
    model = HybridLM(cfg.model)
    load_weights(run / "checkpoints" / "step_3", model)
    exported = load_file(str(out))
    for name, t in model.state_dict().items():
        torch.testing.assert_close(exported[name], t, rtol=0, atol=0)
    init = run_module(["-m", "hylo.trainer.train", f"run.dir={tmp_path / 'init'}", f"data.path={shards}",
                       "train.steps=1",
                       f"model.init_from={out}", *SMALL])
    assert init.returncode == 0, init.stderr[-2000:]
    assert f"from the weights of {out}" in init.stdout and "from scratch" not in init.stdout
    # starting from trained weights: the first loss is far below a fresh model's ~ln(4096) = 8.3
    assert losses(tmp_path / "init")[1] < losses(run)[1] - 0.3
    wrong = run_module(["-m", "hylo.trainer.train", f"run.dir={tmp_path / 'wrong'}", f"model.init_from={out}", *SMALL,
                        "model.d_model=96"])
    assert wrong.returncode == 2 and "does not fit this model" in wrong.stderr
    missing = run_module(["-m", "hylo.trainer.cli", "export", "--checkpoint", str(tmp_path / "nope"),
                          "--out", str(out)])
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.parametrize("save, resume", [pytest.param(["parallel.dp_shard=false"], 1, marks=pytest.mark.slow),
                                          (["parallel.dp_shard=true"], 4)], ids=["ddp2-to-1", "fsdp2-to-dp2xcp2"])
def test_resume_on_another_layout_continues(straight, shards, tmp_path, free_port, save, resume):
    """DCP reshards model and optimizer; the losses continue as in the uninterrupted run (to float rounding:
    a different layout sums in a different order)."""
    args = [f"run.dir={tmp_path}", f"data.path={shards}", "checkpoint.interval=10", *SMALL]
    first = torchrun(2, free_port, [*args, "train.steps=10", *save])
    assert first.returncode == 0, first.stderr[-3000:]
    extra = ["parallel.cp=2", "parallel.dp_shard=true"] if resume == 4 else []
    if resume == 1:
        second = run_module(["-m", "hylo.trainer.train", *args, "train.steps=20"])
    else:
        second = torchrun(resume, free_port, [*args, "train.steps=20", *extra])
    assert second.returncode == 0, second.stderr[-3000:]
    got = losses(tmp_path)
    for step in range(11, 21):
        assert got[step] == pytest.approx(straight[step], rel=1e-4), step


def test_full_disk_fails_clearly_and_keeps_earlier(tmp_path, monkeypatch):
    import errno

    import torch.distributed.checkpoint as dcp

    from hylo.models.lm import HybridLM
    from hylo.trainer.checkpointing import DCPCheckpointer as Checkpointer
    from hylo.trainer.checkpointing import latest_checkpoint
    from hylo.trainer.config import ModelConfig
    from hylo.trainer.errors import CheckpointWriteError

    model = HybridLM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2))
    optimizer = torch.optim.AdamW(model.parameters())
    saver = Checkpointer(tmp_path)
    saver.save(1, model, optimizer, {"step": 1})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp, "save", no_space)
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint step_2.tmp: the disk is full"):
        saver.save(2, model, optimizer, {"step": 2})
    assert latest_checkpoint(tmp_path).name == "step_1" and not (tmp_path / "step_2.tmp").exists()
