"""train.engine=deepspeed: ZeRO 1-3 on 2 CPU ranks (gloo, DS_ACCELERATOR=cpu) against the torch engine, exact
resume from DeepSpeed checkpoints, context parallelism under the engine, and the errors users meet."""

import json
import re
import shutil
import socket
import sys

import pytest
import torch

from hylo.trainer.checkpointing.deepspeed import require_deepspeed
from hylo.trainer.config import load_config
from hylo.trainer.engines import engine_problem
from hylo.trainer.engines.deepspeed_engine import deepspeed_config
from hylo.trainer.errors import ConfigError
from tests.conftest import ROOT, run_module
from tests.test_checkpoint import torchrun

pytest.importorskip("deepspeed")

SMALL = ["model.d_model=64", "model.n_layers=2", "train.batch_size=8", "train.seq_len=64", "logging.interval=1",
         "logging.progress=false", "logging.sink_interval=0", "train.lr=3e-3", "schedule.warmup_steps=2"]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir):
    return [(r["step"], r["train/loss"]) for r in rows(run_dir) if "train/loss" in r]


@pytest.fixture(scope="module")
def torch_first_loss(tmp_path_factory):
    """The torch engine's (DDP) first-step loss on 2 ranks: what every ZeRO stage must reproduce."""
    run_dir = tmp_path_factory.mktemp("torch_engine")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    res = torchrun(2, port, [f"run.dir={run_dir}", "train.steps=1", "checkpoint.interval=0", *SMALL])
    assert res.returncode == 0, res.stderr[-3000:]
    return train_losses(run_dir)[0][1]


# ZeRO-3 with accumulation is the default suite's case (it shards most); stages 1 and 2 run under -m slow.
@pytest.mark.parametrize("stage,extra", [pytest.param(1, [], marks=pytest.mark.slow),
                                         pytest.param(2, [], marks=pytest.mark.slow),
                                         (3, ["train.micro_batch_size=2"])],
                         ids=["zero1", "zero2", "zero3-accum2"])
def test_zero_stage_trains_matches_torch_and_resumes_exactly(stage, extra, torch_first_loss, tmp_path, free_port):
    args = [f"run.dir={tmp_path}", "train.engine=deepspeed", f"deepspeed.zero_stage={stage}", "train.steps=6",
            "checkpoint.interval=3", *SMALL, *extra]
    first = torchrun(2, free_port, args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "FutureWarning" not in first.stderr  # DeepSpeed's deprecated collectives: not ours to print
    # declared by the engine, said once at the start (not silently dropped)
    assert first.stderr.count("per-layer gradient norms (logging.layer_interval) is off for this run") == 1
    straight = dict(train_losses(tmp_path))
    assert straight[1] == pytest.approx(torch_first_loss, rel=1e-5)  # same model, same batch, no update yet
    assert sum(straight[s] for s in (4, 5, 6)) / 3 < straight[1] - 0.1  # it learns (batches differ: a mean)
    state = json.loads((tmp_path / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert (state["engine"], state["zero_stage"], state["world_size"]) == ("deepspeed", stage, 2)

    # Crash after step 3: drop the later checkpoint and rerun the same command; it resumes from step_3.
    shutil.rmtree(tmp_path / "checkpoints" / "step_6")
    second = torchrun(2, free_port, args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout and "step_3" in second.stdout
    resumed = train_losses(tmp_path)[3:]  # steps 4..6 once: the resumed run's (the first's are set aside)
    assert [s for s, _ in train_losses(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in resumed] == [4, 5, 6]
    assert all(loss == straight[s] for s, loss in resumed), (resumed, straight)  # bit-exact, data position included

    if stage == 3:  # a DeepSpeed checkpoint, even ZeRO-3's shards, is usable outside the engine ...
        ev = run_module(["-m", "hylo.trainer.cli", "eval", "--checkpoint", str(tmp_path / "checkpoints" / "step_6"),
                         "--task", "ppl", "--batches", "1"])
        assert ev.returncode == 0, ev.stderr[-3000:]
        hf = run_module(["-m", "hylo.trainer.cli", "export", "--checkpoint", str(tmp_path / "checkpoints" / "step_6"),
                         "--format", "hf", "--dtype", "fp32", "--out", str(tmp_path / "hf")])
        assert hf.returncode == 0, hf.stderr[-3000:]  # ... also to transformers, the same model
        from transformers import AutoModelForCausalLM

        from hylo.trainer.checkpointing.export import load_trained_model

        model, _ = load_trained_model(tmp_path / "checkpoints" / "step_6")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32)
        tokens = torch.randint(0, model.cfg.vocab_size, (1, 16))
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)
        # ... but the torch engine refuses to resume it, saying why (named: a plain resume takes the run's engine)
        wrong = torchrun(2, free_port, [*args[:1], "train.steps=8", "checkpoint.interval=0", "train.engine=torch",
                                        *SMALL])
        # (torchrun itself exits 1 whenever a worker fails; the worker's own code is 2: refused at start)
        assert wrong.returncode == 1 and "written by train.engine=deepspeed" in wrong.stderr


@pytest.mark.parametrize("cp_mode", [pytest.param("ring", marks=pytest.mark.slow), "ulysses"])
def test_context_parallel_under_deepspeed_matches_one_rank(cp_mode, tmp_path, free_port):
    """cp=2 (ring or Ulysses for `full`, state passing for tnl/based, summaries for rat) inside ZeRO-2 == one
    plain rank."""
    model = ["model.pattern=[full,rat,based,tnl]", "model.n_layers=4"]
    one = run_module(["-m", "hylo.trainer.train", f"run.dir={tmp_path / 'one'}", "train.steps=2",
                      "checkpoint.interval=0",
                      *SMALL, *model])
    assert one.returncode == 0, one.stderr[-3000:]
    cp = torchrun(2, free_port, [f"run.dir={tmp_path / 'cp'}", "train.engine=deepspeed", "deepspeed.zero_stage=2",
                                 "parallel.cp=2", f"parallel.cp_mode={cp_mode}", "train.steps=2",
                                 "checkpoint.interval=0", *SMALL, *model])
    assert cp.returncode == 0, cp.stderr[-3000:]
    ref, got = rows(tmp_path / "one"), rows(tmp_path / "cp")
    for a, b in zip(ref, got, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)


def test_deepspeed_config_is_derived_from_ours():
    cfg = load_config(None, ["train.engine=deepspeed", "deepspeed.zero_stage=3", "train.grad_clip=0.5",
                             "deepspeed.config={zero_optimization: {overlap_comm: true}, flops_profiler: "
                             "{enabled: true}}"])
    ds = deepspeed_config(cfg, micro=2, accum=4, bf16=True)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}  # raw keys merge into ours
    assert ds["flops_profiler"] == {"enabled": True}


@pytest.mark.parametrize("override,message", [
    ("deepspeed.config={gradient_accumulation_steps: 4}", "derived from hylo's config"),
    ("deepspeed.config={zero_optimization: {stage: 1}}", "zero_optimization.stage is derived"),
    ("parallel.dp_shard=true", "use deepspeed.zero_stage=3 instead"),
    ("train.nan_policy=skip", "nan_policy=skip is not supported"),
    ("checkpoint.async_save=true", "writes its checkpoints synchronously"),
    ("deepspeed.zero_stage=4", "is not one of 0, 1, 2, 3"),
])
def test_unsupported_combinations_fail_clearly(override, message):
    """Refused before any work, from the engine's declared capabilities (and its own checks)."""
    assert re.search(message, engine_problem(load_config(None, ["train.engine=deepspeed", override])))


def test_tiled_mlp_is_refused_under_zero3_only():
    tiled = ["train.engine=deepspeed", "model.mlp_tile=64"]
    assert "model.mlp_tile is not supported with deepspeed.zero_stage=3" in engine_problem(
        load_config(None, [*tiled, "deepspeed.zero_stage=3"]))
    assert engine_problem(load_config(None, [*tiled, "deepspeed.zero_stage=2"])) is None


def test_missing_deepspeed_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'hylo\[deepspeed\]'"):
        require_deepspeed()


@pytest.mark.slow  # the engine itself trains in test_zero_stage_..., the launcher in test_launch
def test_deepspeed_launcher_smoke_run(tmp_path):
    res = run_module(["-m", "hylo.trainer.cli", "launch", "--engine", "deepspeed", "--gpus-per-node", "2",
                      "--master-port", "29431", "--", f"run.dir={tmp_path}", "train.steps=2", "checkpoint.interval=0",
                      *SMALL], cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("deepspeed --num_gpus=2 --master_port=29431 --no_local_rank "
                                 "--module hylo.trainer.train")
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]
