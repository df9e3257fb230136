"""Checkpoints that cannot lie: checksum manifests refuse damaged or edited files, the DCP metadata is never
unpickled beyond DCP's own types, a crash anywhere in a re-save or a prune leaves the newest complete checkpoint
loadable, a full disk says so, and background saves in the middle of multi-rank runs resume bit-exactly."""

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hylo.models.lm import HybridLM
from hylo.trainer.checkpointing import (
    DCPCheckpointer,
    complete_checkpoints,
    load_weights,
    recover_leftovers,
    verified_checkpoint,
    verify_checkpoint,
)
from hylo.trainer.checkpointing.integrity import MANIFEST, write_manifest
from hylo.trainer.checkpointing.step_folder import MARKER
from hylo.trainer.config import ModelConfig
from hylo.trainer.errors import CheckpointError, CheckpointWriteError
from tests.conftest import ROOT, run_module, subprocess_env
from tests.test_checkpoint import SMALL, losses, shards, torchrun  # noqa: F401 - shards is a fixture


def tiny():
    model = HybridLM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 64, (1, 8))).float().sum().backward()
    optimizer.step()
    return model, optimizer


def state(step):
    return {"step": step, "data": {}, "scheduler": {}}


@pytest.fixture
def saved(tmp_path):
    model, optimizer = tiny()
    saver = DCPCheckpointer(tmp_path, keep_last=0)
    for step in (1, 2):
        saver.save(step, model, optimizer, state(step))
    return tmp_path, model


def test_manifest_covers_every_file(saved):
    root, _ = saved
    folder = root / "step_2"
    manifest = json.loads((folder / MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MANIFEST, MARKER}
    assert set(manifest) == on_disk and ".metadata" in on_disk and "trainer_state.json" in on_disk
    assert verify_checkpoint(folder) is None


def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 1 << (offset % 8)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["bit-flip", "zeroed-block", "json-edit", "rng-edit", "extra-file", "missing"])
def test_damage_is_refused_by_name(saved, damage):
    root, model = saved
    folder = root / "step_2"
    shard = next(folder.glob("*.distcp"))
    if damage == "bit-flip":
        _flip_bit(shard, int(torch.randint(0, shard.stat().st_size * 8, ()).item()) // 8)
        name = shard.name
    elif damage == "zeroed-block":
        data = bytearray(shard.read_bytes())
        start = int(torch.randint(0, max(1, len(data) - 4096), ()).item())
        data[start:start + 4096] = bytes(len(data[start:start + 4096]))
        shard.write_bytes(bytes(data))
        name = shard.name
    elif damage == "json-edit":  # valid JSON, another step: used silently before manifests
        meta = json.loads((folder / "trainer_state.json").read_text())
        (folder / "trainer_state.json").write_text(json.dumps(dict(meta, step=7)))
        name = "trainer_state.json"
    elif damage == "rng-edit":
        (folder / "rng" / "rank_0.json").write_text("{}")
        name = "rng/rank_0.json"
    elif damage == "extra-file":
        (folder / "__9_0.distcp").write_bytes(b"x")
        name = "__9_0.distcp"
    else:
        shard.unlink()
        name = shard.name
    if damage == "zeroed-block" and verify_checkpoint(folder) is None:
        pytest.skip("the zeroed block held zeros already")  # vanishingly rare: shards are float data
    problem = verify_checkpoint(folder)
    assert problem is not None and name in problem
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_weights(folder, model)
    # auto takes the newest that verifies; a named folder is refused
    assert verified_checkpoint(root, None, say=lambda msg: None) == root / "step_1"
    with pytest.raises(CheckpointError, match=r"step_2' is corrupt"):
        verified_checkpoint(root, folder)


def test_every_checkpoint_corrupt_is_refused_not_restarted(saved):
    root, _ = saved
    for step in (1, 2):
        _flip_bit(next((root / f"step_{step}").glob("*.distcp")), 100)
    with pytest.raises(CheckpointError, match="every checkpoint under .* is corrupt"):
        verified_checkpoint(root, None, say=lambda msg: None)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_metadata_is_refused_without_executing(saved, tmp_path_factory):
    root, model = saved
    folder = root / "step_2"
    marker = tmp_path_factory.mktemp("pwn") / "executed"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    write_manifest(folder, skip={MARKER})  # as an attacker who also rewrote the manifest would
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        load_weights(folder, model)
    assert not marker.exists()


def test_truncated_metadata_is_a_clear_error(saved):
    root, model = saved
    folder = root / "step_2"
    meta = folder / ".metadata"
    meta.write_bytes(meta.read_bytes()[:40])
    write_manifest(folder, skip={MARKER})
    with pytest.raises(CheckpointError, match=r"\.metadata is unreadable"):
        load_weights(folder, model)


def test_legitimate_metadata_round_trips(saved):
    root, model = saved
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_weights(root / "step_2", model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Crash(Exception):
    pass


def _crash_on_call(monkeypatch, n: int) -> None:
    """Raise Crash at the n-th rename or rmtree that hylo's step-folder protocol makes (a kill -9 at that
    instant); DCP's own renames inside its save are left alone."""
    calls = {"n": 0}
    rename, rmtree = Path.rename, shutil.rmtree

    def tick():
        if sys._getframe(2).f_globals.get("__name__") != "hylo.trainer.checkpointing.step_folder":
            return
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash(f"crash at filesystem operation {n}")

    def crashing_rename(self, target):
        tick()
        return rename(self, target)

    def crashing_rmtree(path, *args, **kwargs):
        tick()
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(Path, "rename", crashing_rename)
    monkeypatch.setattr(shutil, "rmtree", crashing_rmtree)


@pytest.mark.parametrize("crash_at", range(1, 8))
def test_crash_anywhere_in_resave_and_prune_keeps_a_complete_checkpoint(tmp_path, monkeypatch, crash_at):
    """Steps 1-3 saved, then step 3 saved again with keep_last=2 (a rollback's re-save, which also prunes) with a
    crash at each of its filesystem operations: clearing an old tmp, clearing an old aside, moving step_3 aside,
    moving the new one in, deleting the old, renaming step_1 for pruning, deleting it.  After start-up recovery
    the newest complete checkpoint is a verified step_3, and nothing is left over."""
    model, optimizer = tiny()
    saver = DCPCheckpointer(tmp_path, keep_last=0)
    for step in (1, 2, 3):
        saver.save(step, model, optimizer, state(step))
    # a rollback: step_2 is loaded and training goes on, so step_3 is written again, now with keep_last=2
    saver.keep_last = 2
    crashed = False
    with monkeypatch.context() as patch:
        _crash_on_call(patch, crash_at)
        try:
            saver.save(3, model, optimizer, state(3))
        except Crash:
            crashed = True
    assert crashed  # every one of the seven operations is a crash point
    notes = []
    recover_leftovers(tmp_path, say=notes.append)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert all("." not in n for n in names), (crash_at, names, notes)  # no .tmp/.old/.pruning left
    newest = complete_checkpoints(tmp_path)[-1][1]
    assert newest.name == "step_3" and verify_checkpoint(newest) is None, (crash_at, names)
    load_weights(newest, tiny()[0])


def test_keep_last_prunes_before_the_save_so_the_disk_never_holds_more(tmp_path, monkeypatch):
    """keep_last >= 2: what a save would prune goes before it writes (a full disk is then fixed by lowering
    keep_last), but never the newest checkpoint before the step (the one a run may have resumed from, past a
    damaged newer one); keep_last=1 keeps its checkpoint until the new one is complete."""
    model, optimizer = tiny()
    on_disk_at_write = {}
    write = DCPCheckpointer._write

    def spy(self, tmp, state):
        on_disk_at_write[tmp.name] = [p.name for _, p in complete_checkpoints(self.root)]
        return write(self, tmp, state)

    monkeypatch.setattr(DCPCheckpointer, "_write", spy)
    saver = DCPCheckpointer(tmp_path / "two", keep_last=2)
    for step in (1, 2, 3):
        saver.save(step, model, optimizer, state(step))
    assert on_disk_at_write["step_3.tmp"] == ["step_2"]
    assert [p.name for _, p in complete_checkpoints(tmp_path / "two")] == ["step_2", "step_3"]
    one = DCPCheckpointer(tmp_path / "one", keep_last=1)
    for step in (1, 2):
        one.save(step, model, optimizer, state(step))
    assert on_disk_at_write["step_2.tmp"] == ["step_1"]
    assert [p.name for _, p in complete_checkpoints(tmp_path / "one")] == ["step_2"]
    # resumed from step_2 past a newer step_5: step_2 stays until step_3 is complete
    rolled = DCPCheckpointer(tmp_path / "rolled", keep_last=0)
    for step in (1, 2, 5):
        rolled.save(step, model, optimizer, state(step))
    rolled.keep_last = 2
    rolled.save(3, model, optimizer, state(3))
    assert on_disk_at_write["step_3.tmp"] == ["step_2", "step_5"]
    assert [p.name for _, p in complete_checkpoints(tmp_path / "rolled")] == ["step_3", "step_5"]


def test_full_disk_inside_dcp_is_clear(tmp_path, monkeypatch):
    """DCP reports a rank's ENOSPC wrapped in a CheckpointException (not an OSError)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    model, optimizer = tiny()
    saver = DCPCheckpointer(tmp_path)
    saver.save(1, model, optimizer, state(1))

    def no_space(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise CheckpointException("save", {0: _wrap_exception(err)}) from None

    monkeypatch.setattr(dcp, "save", no_space)
    with pytest.raises(CheckpointWriteError, match="the disk is full: free space or lower checkpoint.keep_last"):
        saver.save(2, model, optimizer, state(2))
    assert [p.name for p in tmp_path.iterdir()] == ["step_1"] and verify_checkpoint(tmp_path / "step_1") is None


@pytest.fixture(scope="module")
def ten_steps(shards, tmp_path_factory):  # noqa: F811
    """A run saved at steps 5 and 10, copied by each test that damages it."""
    run_dir = tmp_path_factory.mktemp("ten_steps")
    args = ["-m", "hylo.trainer.train", f"run.dir={run_dir}", f"data.path={shards}", "checkpoint.interval=5", *SMALL]
    first = run_module([*args, "train.steps=10"])
    assert first.returncode == 0, first.stderr[-3000:]
    return run_dir


def _damage_step(folder: Path, damage: str) -> str:
    """Damage a saved step folder the way the fault campaign did; returns what the refusal must name."""
    if damage == "bit-flip":
        _flip_bit(next(folder.glob("*.distcp")), 777)
        return ".distcp"
    if damage == "manifest-deleted-and-bit-flip":  # once loaded unverified, the loss changed silently
        (folder / MANIFEST).unlink()
        _flip_bit(next(folder.glob("*.distcp")), 777)
        return f"{MANIFEST} is missing"
    if damage == "metadata-crafted":  # with the manifest rewritten to match, as an attacker would
        (folder / ".metadata").write_bytes(pickle.dumps(_Payload(folder / "executed")))
        write_manifest(folder, skip={MARKER})
        return "refuses to unpickle"
    if damage == "metadata-truncated":
        (folder / ".metadata").write_bytes((folder / ".metadata").read_bytes()[:40])
        write_manifest(folder, skip={MARKER})
        return ".metadata is unreadable"
    assert damage == "trainer-state-deleted"
    (folder / "trainer_state.json").unlink()
    return "trainer_state.json is missing"


@pytest.mark.parametrize("damage", ["bit-flip", "manifest-deleted-and-bit-flip", "metadata-crafted",
                                    "metadata-truncated", "trainer-state-deleted"])
def test_resume_auto_falls_back_and_a_named_corrupt_checkpoint_is_refused(ten_steps, shards, tmp_path, damage):  # noqa: F811
    """One line each, before DCP touches anything: a named damaged checkpoint is refused (exit 2), auto-resume
    falls back to the previous one and says why."""
    shutil.copytree(ten_steps, tmp_path, dirs_exist_ok=True)
    args = ["-m", "hylo.trainer.train", f"run.dir={tmp_path}", f"data.path={shards}", "checkpoint.interval=5", *SMALL]
    step_10 = tmp_path / "checkpoints" / "step_10"
    named_by = _damage_step(step_10, damage)
    named = run_module([*args, "train.steps=12", f"checkpoint.resume={step_10}"])
    assert named.returncode == 2 and "step_10' is" in named.stderr and named_by in named.stderr, named.stderr
    auto = run_module([*args, "train.steps=12"])
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "WARNING: skipping checkpoint" in auto.stdout and "step_10" in auto.stdout and named_by in auto.stdout
    assert f"resuming from {tmp_path / 'checkpoints' / 'step_5'}" in auto.stdout
    for noise in ("Traceback", "Global metadata is not found", "AssertionError"):
        assert noise not in named.stderr + auto.stderr, (named.stderr + auto.stderr)[-3000:]
    assert not (step_10 / "executed").exists()


def test_a_checkpoint_saved_without_checksums_loads_without_a_manifest(ten_steps, shards, tmp_path):  # noqa: F811
    """Missing manifests are refused only where the save wrote one: checkpoint.checksums=false runs resume."""
    args = ["-m", "hylo.trainer.train", f"run.dir={tmp_path}", f"data.path={shards}", "checkpoint.interval=5",
            "checkpoint.checksums=false", *SMALL]
    assert run_module([*args, "train.steps=5"]).returncode == 0
    assert not (tmp_path / "checkpoints" / "step_5" / MANIFEST).exists()
    assert verify_checkpoint(tmp_path / "checkpoints" / "step_5") is None
    again = run_module([*args, "train.steps=6"])
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-3000:]


@pytest.mark.parametrize("layout", ["ddp", "fsdp2"])
def test_async_saves_mid_run_then_bit_exact_resume(shards, tmp_path, free_port, layout):  # noqa: F811
    """Background saves at steps 5, 10, 15 while training goes on (and at 20), on 2 ranks: every one completes
    and verifies, and a resume from step 10 reproduces steps 11-20 exactly."""
    extra = ["parallel.dp_shard=true"] if layout == "fsdp2" else []
    args = [f"run.dir={tmp_path}", f"data.path={shards}", "checkpoint.interval=5", "checkpoint.async=true",
            "train.steps=20", *SMALL, *extra]
    first = torchrun(2, free_port, args)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = tmp_path / "checkpoints"
    assert [p.name for _, p in complete_checkpoints(ckpts)] == ["step_5", "step_10", "step_15", "step_20"]
    assert all(verify_checkpoint(p) is None for _, p in complete_checkpoints(ckpts))
    reference = losses(tmp_path)
    second = torchrun(2, free_port, [*args, f"checkpoint.resume={ckpts / 'step_10'}"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert losses(tmp_path) == reference


@pytest.mark.slow
def test_async_saves_mid_run_on_four_ranks(shards, tmp_path, free_port):  # noqa: F811
    args = [f"run.dir={tmp_path}", f"data.path={shards}", "checkpoint.interval=4", "checkpoint.async=true",
            "train.steps=12", *SMALL]
    first = torchrun(4, free_port, args)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = losses(tmp_path)
    second = torchrun(4, free_port, [*args, f"checkpoint.resume={tmp_path / 'checkpoints' / 'step_4'}"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert losses(tmp_path) == reference


def test_leftovers_are_reported_at_start(shards, tmp_path):  # noqa: F811
    args = ["-m", "hylo.trainer.train", f"run.dir={tmp_path}", f"data.path={shards}", "checkpoint.interval=5", *SMALL]
    assert run_module([*args, "train.steps=5"]).returncode == 0
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(ckpts / "step_5", ckpts / "step_9.tmp")
    shutil.copytree(ckpts / "step_5", ckpts / "step_7")
    (ckpts / "step_7" / MARKER).unlink()  # complete but for its marker: never loaded, and said so
    (ckpts / "step_5").rename(ckpts / "step_5.old")  # a re-save of step 5 cut off after moving it aside
    res = run_module([*args, "train.steps=6"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "recovered step_5" in res.stdout and "removed step_9.tmp" in res.stdout
    assert "skipping checkpoint" in res.stdout and "step_7: incomplete" in res.stdout
    assert f"resuming from {ckpts / 'step_5'}" in res.stdout

# ---------------------------------------------------------------------------------------------- one job per run dir
def _start(args: list[str], log: Path, torchrun_ranks: int = 0, port: int = 0) -> subprocess.Popen:
    if torchrun_ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun_ranks}",
               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "-m", "hylo.trainer.train", *args]
    else:
        cmd = [sys.executable, "-m", "hylo.trainer.train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            text=True)


def _processes_with(text: str) -> list[int]:
    """PIDs whose command line contains `text` (what pgrep -f does, without needing procps)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _wait_for_steps(run_dir: Path, n: int, timeout: float = 180) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < n):
        time.sleep(0.2)
    assert metrics.exists() and len(metrics.read_text().splitlines()) >= n, "the run did not start"


def test_second_job_on_a_run_dir_is_refused_and_a_dead_holder_is_taken_over(shards, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    args = [f"run.dir={run}", f"data.path={shards}", "checkpoint.interval=0", *SMALL]
    first = _start([*args, "train.steps=100000"], tmp_path / "first.log")
    try:
        _wait_for_steps(run, 2)
        second = run_module(["-m", "hylo.trainer.train", *args, "train.steps=2", "checkpoint.resume=auto"])
        assert second.returncode == 2, second.stderr[-2000:]
        assert "is in use by another job" in second.stderr and f"pid {first.pid}" in second.stderr
    finally:
        first.kill()  # kill -9: the lock file stays, the kernel drops the lock
        first.wait(timeout=60)
    third = run_module(["-m", "hylo.trainer.train", *args, "train.steps=2"])
    assert third.returncode == 0, third.stderr[-2000:]
    assert "took over the run dir lock" in third.stdout and f"pid {first.pid}" in third.stdout
    assert not (run / "hylo.lock").exists()  # released at the end


def test_ctrl_c_saves_and_exits_zero(shards, tmp_path):  # noqa: F811
    proc = _start([f"run.dir={tmp_path}", f"data.path={shards}", "train.steps=100000", "checkpoint.interval=0",
                   *SMALL], tmp_path / "out.log")
    _wait_for_steps(tmp_path, 3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0, (tmp_path / "out.log").read_text()[-3000:]
    out = (tmp_path / "out.log").read_text()
    assert "interrupted: saving at the next step boundary" in out and "preempted: saved step" in out
    step = max(losses(tmp_path))
    assert verify_checkpoint(tmp_path / "checkpoints" / f"step_{step}") is None


def test_orphaned_ranks_stop_and_save_when_the_launcher_dies(shards, tmp_path, free_port):  # noqa: F811
    agent = _start([f"run.dir={tmp_path}", f"data.path={shards}", "train.steps=100000", "checkpoint.interval=0",
                    *SMALL], tmp_path / "out.log", torchrun_ranks=2, port=free_port)
    _wait_for_steps(tmp_path, 3)
    agent.kill()  # kill -9 of the torchrun agent: its workers are re-parented and would train on
    agent.wait(timeout=60)
    deadline = time.time() + 180
    while time.time() < deadline:
        alive = _processes_with(f"run.dir={tmp_path}")
        if not alive:
            break
        time.sleep(0.5)
    assert not alive, "orphaned ranks kept training after their launcher died"
    out = (tmp_path / "out.log").read_text()
    assert "its launcher died: saved step" in out, out[-3000:]
    assert "[hylo] done." not in out and "stopped at step" in out  # not read as a finished run
    newest = complete_checkpoints(tmp_path / "checkpoints")[-1][1]
    assert verify_checkpoint(newest) is None and not (tmp_path / "hylo.lock").exists()


def test_ranks_end_with_one_line_when_the_launcher_dies_during_start_up(shards, tmp_path, free_port):  # noqa: F811
    """kill -9 of the torchrun agent while its ranks are still starting (held in start-up by the fault hook): both
    ranks end within seconds, each with one line, no traceback, and nothing trained."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{free_port}", "-m", "tests.fault_run", f"run.dir={tmp_path / 'run'}",
           f"data.path={shards}", "train.steps=5", *SMALL]
    log = tmp_path / "out.log"
    agent = subprocess.Popen(cmd, cwd=ROOT, env={**subprocess_env(), "HYLO_FAULT": "slow_start:300"},
                             stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(ranks := [p for p in _processes_with(f"run.dir={tmp_path / 'run'}")
                                                   if p != agent.pid]) < 2:
        time.sleep(0.2)
    assert len(ranks) == 2, "the ranks did not start"
    time.sleep(3)  # inside start-up now (the hook holds them for 300 s)
    agent.kill()
    agent.wait(timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline and _processes_with(f"run.dir={tmp_path / 'run'}"):
        time.sleep(0.5)
    assert not _processes_with(f"run.dir={tmp_path / 'run'}"), "ranks outlived their launcher in start-up"
    out = log.read_text()
    assert out.count("died during start-up; stopping") == 2 and "Traceback" not in out, out[-3000:]


def test_the_rank_that_outlives_a_killed_peer_says_so_in_one_line(shards, tmp_path, free_port):  # noqa: F811
    """kill -9 of rank 1 mid-run, no restarts: rank 0 ends without a traceback of its own (a lost connection is one
    line; torchrun's SIGTERM is a preemption), and no checkpoint is left half-written."""
    res = torchrun(2, free_port, [f"run.dir={tmp_path}", f"data.path={shards}", "train.steps=30",
                                  "checkpoint.interval=4", *SMALL], {"HYLO_FAULT": "kill:9:1"})
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert not [line for line in out.splitlines() if line.strip().startswith('File "') and "/trainer/" in line], \
        out[-3000:]
    assert "rank 0 lost contact with the job" in out or "preempted: saved step" in out, out[-3000:]
    assert all(verify_checkpoint(p) is None for _, p in complete_checkpoints(tmp_path / "checkpoints"))


def test_checksums_can_be_turned_off(tmp_path):
    model, optimizer = tiny()
    saver = DCPCheckpointer(tmp_path, checksums=False)
    saver.save(1, model, optimizer, state(1))
    assert not (tmp_path / "step_1" / MANIFEST).exists()
    assert verified_checkpoint(tmp_path, None, verify=False) == tmp_path / "step_1"


def test_a_real_full_disk(tmp_path):
    """On a tmpfs just large enough for one checkpoint (root can mount one; skipped where it cannot)."""
    model, optimizer = tiny()
    probe = tmp_path / "probe"
    DCPCheckpointer(probe).save(1, model, optimizer, state(1))
    size = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    pages = (size * 3 // 2) // 4096 + 4
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * 4096}", "tmpfs", str(mount)],
                                 capture_output=True).returncode == 0
    except OSError:  # no mount command at all
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-ENOSPC tests cover the logic")
    try:
        saver = DCPCheckpointer(mount / "checkpoints")
        saver.save(1, model, optimizer, state(1))
        with pytest.raises(CheckpointWriteError, match="the disk is full: free space or lower checkpoint.keep_last"):
            saver.save(2, model, optimizer, state(2))
        assert sorted(p.name for p in (mount / "checkpoints").iterdir()) == ["step_1"]
        assert verify_checkpoint(mount / "checkpoints" / "step_1") is None
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
