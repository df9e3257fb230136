import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hylo.trainer.config import load_config
from hylo.trainer.errors import ConfigError
from hylo.trainer.train import train
from tests.conftest import run_module

TAGS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu"]


def read_metrics(run_dir, kind="train/loss"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind in r]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config("configs/tiny.yaml", [f"run.dir={run_dir}", "train.steps=50", "logging.interval=5",
                                            "checkpoint.interval=25", "logging.progress=false"])
    return run_dir, train(cfg)


def test_loss_falls(tiny_run):
    run_dir, summary = tiny_run
    losses = [m["train/loss"] for m in read_metrics(run_dir)]
    assert losses[0] > 8.0  # ~ln(4096) at initialisation
    assert summary["last_loss"] < losses[0] - 1.5, losses  # a clear drop, not noise


def test_tensorboard_has_every_tag_once_per_logged_step(tiny_run):
    run_dir, _ = tiny_run
    logged_steps = [m["step"] for m in read_metrics(run_dir)]
    assert logged_steps == [1, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    for tag in TAGS:
        assert [e.step for e in acc.Scalars(tag)] == logged_steps, tag
    mem = [e.value for e in acc.Scalars("train/mem_gb")]  # peak resident memory on CPU: positive, never falling
    assert len(mem) == len(logged_steps) and 0 < mem[0] <= mem[-1] < 64 and mem == sorted(mem)
    # the sink monitor (every logging.sink_interval = 50 steps), for both attention layers of [swa, full] x4
    for layer in range(4):
        for what in ("sink_mass", "first_token_mass", "secondary_top_mass"):
            events = acc.Scalars(f"sinks/layer{layer}/{what}/head0")
            assert [e.step for e in events] == [50] and 0 <= events[0].value <= 1
    assert [r["step"] for r in read_metrics(run_dir, "sinks/layer0/secondary_sinks")] == [50]
    assert (run_dir / "config.yaml").read_text().count("steps: 50") == 1


def test_checkpoints_and_resume(tiny_run):
    run_dir, _ = tiny_run
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_25", "step_50"]
    cfg = load_config(None, [f"run.dir={run_dir}", "train.steps=55", "logging.interval=5",
                             "checkpoint.interval=0", "logging.progress=false"])
    summary = train(cfg)
    assert summary["start_step"] == 50
    assert read_metrics(run_dir)[-1]["step"] == 55
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(load_config(None, [f"run.dir={run_dir}", "checkpoint.resume=none"]))


def test_resume_from_wrong_model_shape_fails_clearly(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    step_25 = run_dir / "checkpoints" / "step_25"
    cfg = load_config(None, [f"run.dir={tmp_path}", "model.d_model=64", f"checkpoint.resume={step_25}",
                             "logging.progress=false"])
    with pytest.raises(ConfigError, match=r"another shape \(model.d_model 128 -> 64\).*cannot change on resume"):
        train(cfg)


def test_cli_errors_exit_nonzero_with_message(tmp_path):
    bad_key = run_module(["-m", "hylo.trainer.train", "train.stepz=3", f"run.dir={tmp_path}"])
    assert bad_key.returncode == 2 and "unknown config key 'train.stepz'" in bad_key.stderr
    bad_type = run_module(["-m", "hylo.trainer.cli", "train", "model.d_model=big", f"run.dir={tmp_path}"])
    assert bad_type.returncode == 2 and "model.d_model" in bad_type.stderr
    no_data = run_module(["-m", "hylo.trainer.train", "data.path=/no/such/corpus", f"run.dir={tmp_path}"])
    assert no_data.returncode == 2 and "data.path '/no/such/corpus' does not exist" in no_data.stderr
    assert not (tmp_path / "checkpoints").exists()  # nothing was started


def test_hylo_tokenize(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    out = tmp_path / "tok.json"
    res = run_module(["-m", "hylo.trainer.cli", "tokenize", "--input", str(tmp_path / "a.txt"), "--vocab-size", "300",
                      "--output", str(out)])
    assert res.returncode == 0, res.stderr
    assert out.is_file() and "wrote" in res.stdout


def test_the_loop_reads_nothing_from_the_device_between_logging_steps(tmp_path, monkeypatch):
    """No host synchronisation per step: outside the engine's own step, a step that is not a logging step reads
    no tensor value (no .item(), bool(), float(), int(), .tolist()) — not the non-finite check, not the loss, not
    the spike detector, not the preemption poll.  Logging steps do (the counter counts)."""
    import torch

    from hylo.trainer.callbacks import Callback
    from hylo.trainer.engines.torch_engine import TorchEngine

    reads: dict[int, int] = {}
    now = {"step": 0, "in_engine": False}

    def count(name: str) -> None:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            if not now["in_engine"]:
                reads[now["step"]] = reads.get(now["step"], 0) + 1
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        count(name)
    engine_step = TorchEngine.train_step

    def step_in_engine(self, *args, **kwargs):
        now["in_engine"] = True
        try:
            return engine_step(self, *args, **kwargs)
        finally:
            now["in_engine"] = False
    monkeypatch.setattr(TorchEngine, "train_step", step_in_engine)

    class MarkStep(Callback):
        def on_step_start(self, trainer):
            now["step"] = trainer.step

    cfg = load_config(None, [f"run.dir={tmp_path}", "train.steps=12", "logging.interval=6", "checkpoint.interval=0",
                             "logging.progress=false", "logging.sink_interval=0", "logging.layer_interval=0",
                             "data.prefetch=0", "model.n_layers=2", "train.batch_size=4", "train.seq_len=64"])
    train(cfg, callbacks=[MarkStep()])
    quiet = [s for s in range(2, 12) if s != 6]
    assert all(reads.get(s, 0) == 0 for s in quiet), reads
    assert reads[6] > 0 and reads[12] > 0, reads


@pytest.mark.parametrize("overrides, device, compiled, note", [
    ([], "cpu", False, None),  # the default never compiles a CPU run (the README's main job stays eager)
    (["logging.sink_interval=0", "logging.layer_interval=0"], "cpu", False, None),
    ([], "cuda", False, "logging.sink_interval=50"),  # monitors read layers through forward hooks
    (["logging.sink_interval=0", "logging.layer_interval=0"], "cuda", True, None),
    (["model.pattern=[rat]", "logging.sink_interval=50", "logging.layer_interval=0"], "cuda", True, None),
    (["logging.sink_interval=0", "logging.layer_interval=0", "train.activation_checkpointing=selective"], "cuda",
     False, "selective"),
    (["logging.sink_interval=0", "logging.layer_interval=0", "data.document_masking=true"], "cuda", False,
     "document_masking"),
    (["logging.sink_interval=0", "logging.layer_interval=0", "train.engine=deepspeed"], "cuda", False, "DeepSpeed"),
    (["logging.sink_interval=0", "logging.layer_interval=0", "parallel.cp=2"], "cuda", False, "context parallel"),
    (["train.compile=on"], "cpu", True, None),
    (["train.compile=true"], "cpu", True, None),  # the boolean it used to be
    (["train.compile=false", "logging.sink_interval=0", "logging.layer_interval=0"], "cuda", False, None),
], ids=["cpu-default", "cpu-no-monitors", "cuda-monitors", "cuda", "cuda-rat-only", "cuda-selective", "cuda-docs",
        "cuda-deepspeed", "cuda-cp", "on",
        "legacy-true", "off"])
def test_compile_auto_compiles_only_cuda_runs_it_can(overrides, device, compiled, note):
    from hylo.trainer.config import compile_choice

    chosen, why = compile_choice(load_config("configs/tiny.yaml", overrides), device)
    assert chosen == compiled
    assert (why is None) if note is None else (note in why)


def test_compile_auto_falls_back_to_eager_when_torch_compile_fails(tmp_path, monkeypatch, capsys):
    """`auto` chose to compile and torch.compile fails in the first step: one line says so and the run trains on
    eager blocks, with the losses of an eager run."""
    import torch._dynamo.exc

    import hylo.trainer.trainer as trainer_module

    common = ["train.steps=3", "logging.interval=1", "logging.progress=false", "checkpoint.interval=0",
              "logging.sink_interval=0", "logging.layer_interval=0", "eval.interval=0"]
    eager = tmp_path / "eager"
    train(load_config("configs/tiny.yaml", [f"run.dir={eager}", "train.compile=off", *common]))

    def broken_compile(self, **kwargs):  # what a model torch.compile cannot handle does at its first call
        def fail(*args, **kwargs):
            raise torch._dynamo.exc.Unsupported("a graph break this model cannot avoid")
        self._compiled_call_impl = fail

    monkeypatch.setattr(trainer_module, "compile_choice", lambda cfg, device, checkpointing=None: (True, None))
    monkeypatch.setattr(torch.nn.Module, "compile", broken_compile)
    fell_back = tmp_path / "fell_back"
    train(load_config("configs/tiny.yaml", [f"run.dir={fell_back}", "train.compile=auto", *common]))
    out = capsys.readouterr().out
    assert "torch.compile failed on this model (Unsupported: a graph break this model cannot avoid)" in out
    assert [r["train/loss"] for r in read_metrics(fell_back)] == [r["train/loss"] for r in read_metrics(eager)]
    # asked for by name, a failure is the user's to see
    with pytest.raises(torch._dynamo.exc.Unsupported):
        train(load_config("configs/tiny.yaml", [f"run.dir={tmp_path / 'on'}", "train.compile=on", *common]))


@pytest.mark.parametrize("masking", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["rows", "documents"])
def test_compiled_blocks_train_as_eager_ones_for_every_layer_type(masking, tmp_path, monkeypatch):
    """hybrid_tiny (every layer type) with train.compile=on equals eager: loss and gradient norm at each of the
    first steps; one graph per block (fullgraph), or with packed documents graphs broken where the ops read the
    boundaries.  (aot_eager: dynamo's capture and AOT autograd, without Inductor's C++ code generation, to stay
    fast on the CPU.  The documents case compiles a graph per piece between boundary reads: ~50 s here, slow.)"""
    import functools

    import torch

    common = ["train.steps=2", "logging.interval=1", "logging.progress=false", "checkpoint.interval=0",
              "eval.interval=0", "train.seq_len=64", "train.batch_size=2", f"data.document_masking={masking}"]
    eager = tmp_path / "eager"
    train(load_config("configs/hybrid_tiny.yaml", [f"run.dir={eager}", "train.compile=off", *common]))
    monkeypatch.setattr(torch.nn.Module, "compile",
                        functools.partialmethod(torch.nn.Module.compile, backend="aot_eager"))
    torch._dynamo.reset()
    compiled = tmp_path / "compiled"
    train(load_config("configs/hybrid_tiny.yaml", [f"run.dir={compiled}", "train.compile=on", *common]))
    for key in ("train/loss", "train/grad_norm"):
        a, b = [r[key] for r in read_metrics(compiled, key)], [r[key] for r in read_metrics(eager, key)]
        assert len(a) == 2 and a == pytest.approx(b, rel=1e-5), (key, a, b)


def test_checkpointing_auto_picks_by_the_host_memory_and_config_keeps_auto(tmp_path, monkeypatch, capsys):
    """On the CPU, `auto` plans against this rank's share of host memory: none when it fits (said nothing),
    otherwise the cheapest policy that fits, said in one line; config.yaml keeps `auto` for the next resume."""
    import hylo.trainer.memory_plan as plan

    common = ["train.steps=1", "logging.progress=false", "checkpoint.interval=0", "eval.interval=0",
              "train.seq_len=256", "train.batch_size=2"]
    run = tmp_path / "roomy"
    train(load_config("configs/hybrid_tiny.yaml", [f"run.dir={run}", *common]))
    assert "activation_checkpointing=auto" not in capsys.readouterr().out
    assert "activation_checkpointing: auto" in (run / "config.yaml").read_text()
    cfg = load_config("configs/hybrid_tiny.yaml", [f"run.dir={tmp_path / 'x'}", *common])
    cfg.model.vocab_size = 4096
    totals = {p: plan.plan_memory(plan._with(cfg, train__activation_checkpointing=p), 1, 1000, "cpu").total
              for p in ("none", "selective", "full")}
    memory = 1.001 * totals["full"] / plan.GiB  # room for full checkpointing, not for none
    expected = next(p for p in ("none", "selective", "full") if totals[p] <= memory * plan.GiB)
    assert expected != "none"
    monkeypatch.setattr(plan, "host_memory_gib", lambda: memory)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    run = tmp_path / "tight"
    train(load_config("configs/hybrid_tiny.yaml", [f"run.dir={run}", *common, "checkpoint.interval=1"]))
    out = capsys.readouterr().out
    assert f"train.activation_checkpointing=auto: {expected}" in out, out.splitlines()[1][:200]
    assert "activation_checkpointing: auto" in (run / "config.yaml").read_text()
    # the checkpoint's own record (what a resume starts from) keeps auto too: a resume decides again
    state = json.loads(next((run / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert '"activation_checkpointing": "auto"' in json.dumps(state)


def test_a_plain_sdpa_attention_run_trains_and_monitors(tmp_path):
    """model.attn.backend=sdpa (no sinks): trains, and the sink monitor (which needs the lse SDPA does not give)
    still reports."""
    run = tmp_path / "sdpa"
    train(load_config("configs/tiny.yaml", [f"run.dir={run}", "model.attn.backend=sdpa", "model.attn.sink=false",
                                            "logging.sink_interval=1", "train.steps=2", "logging.interval=1",
                                            "logging.progress=false", "checkpoint.interval=0", "eval.interval=0"]))
    rows = read_metrics(run, "train/loss")
    assert len(rows) == 2 and any(key.startswith("sinks/") for row in
                                  (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
                                  for key in row)
