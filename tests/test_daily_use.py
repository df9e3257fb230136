"""Daily use as a new user meets it: a resume remembers its run's config, a finished run says how to go on, another
engine's checkpoint is refused before any slow work, every --checkpoint takes what users type, bundled configs by
name."""

import pytest

from hylo.trainer.config import load_config
from tests.conftest import run_module

SMALL = ["model.d_model=64", "model.n_layers=2", "train.batch_size=4", "train.seq_len=64", "logging.progress=false",
         "logging.sink_interval=0", "checkpoint.interval=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step run of a non-default shape (what the user would otherwise have to retype)."""
    run_dir = tmp_path_factory.mktemp("run")
    res = run_module(["-m", "hylo.trainer.train", f"run.dir={run_dir}", "train.steps=2", *SMALL])
    assert res.returncode == 0, res.stderr[-2000:]
    return run_dir


def test_resume_starts_from_the_runs_own_config(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path, dirs_exist_ok=True)
    res = run_module(["-m", "hylo.trainer.train", "--resume", f"run.dir={tmp_path}", "train.steps=3"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming with the config" in res.stdout and "train.steps=3" in res.stdout
    assert "0.37M params, layers ['swa', 'full'] x2" in res.stdout  # the run's shape, not the default's
    assert "train.steps 2 -> 3" in res.stdout and "model." not in res.stdout.split("differ from")[-1].split("\n")[0]
    # an explicit --config wins, and says so (here: the default shape, which does not fit the checkpoint)
    explicit = run_module(["-m", "hylo.trainer.train", "--config", "tiny", "--resume", f"run.dir={tmp_path}",
                           "train.steps=4"])
    assert explicit.returncode == 2 and "with --config tiny as given" in explicit.stdout
    assert "cannot change on resume" in explicit.stderr
    # the same steps again: nothing to do, and how to go on
    again = run_module(["-m", "hylo.trainer.train", f"run.dir={tmp_path}", "train.steps=3"])
    assert again.returncode == 0 and "nothing to do. To train on, raise train.steps" in again.stdout
    assert "give a new run.dir" in again.stdout
    assert "train:" not in again.stderr and "[hylo] done." not in again.stdout  # one line: no empty bars


def test_another_engines_checkpoint_is_refused_before_building(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path, dirs_exist_ok=True)
    res = run_module(["-m", "hylo.trainer.train", f"run.dir={tmp_path}", "train.steps=4", "train.engine=deepspeed"])
    assert res.returncode == 2 and "was written by train.engine=torch" in res.stderr, res.stderr[-2000:]
    assert "its own run.dir" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("form", ["run-dir", "checkpoints-folder", "step-folder"])
def test_every_checkpoint_argument_takes_what_users_type(run, tmp_path, form):
    given = {"run-dir": run, "checkpoints-folder": run / "checkpoints", "step-folder": run / "checkpoints" / "step_2"}
    res = run_module(["-m", "hylo.trainer.cli", "export", "--checkpoint", str(given[form]), "--out",
                      str(tmp_path / "m.safetensors")])
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "m.safetensors").is_file()
    if form != "step-folder":
        assert f"using {run / 'checkpoints' / 'step_2'}" in res.stdout


def test_a_missing_checkpoint_names_the_command(tmp_path):
    for command in ("export", "generate"):
        extra = ["--out", str(tmp_path / "m.safetensors")] if command == "export" else ["--prompt", "x"]
        res = run_module(["-m", "hylo.trainer.cli", command, "--checkpoint", str(tmp_path / "nope"), *extra])
        assert res.returncode == 2 and f"hylo {command}: --checkpoint" in res.stderr, res.stderr[-2000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_module(["-m", "hylo.trainer.cli", "generate", "--checkpoint", str(empty), "--prompt", "x"])
    assert res.returncode == 2 and "hylo generate: no complete checkpoint under" in res.stderr


def test_bundled_configs_by_name():
    assert load_config("hybrid_tiny").model.pattern == load_config("configs/hybrid_tiny.yaml").model.pattern
    assert load_config("hybrid_tiny.yaml").model.pattern == load_config("configs/hybrid_tiny.yaml").model.pattern


@pytest.mark.parametrize("command", ["train", "eval", "export", "generate", "plan", "launch", "report", "tokenize"])
def test_help_imports_no_torch(command):
    code = ("import sys, contextlib, io\nfrom hylo.trainer.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    rc = main([{command!r}, '--help'])\n"
            "assert rc == 0 and 'usage: hylo' in out.getvalue(), out.getvalue()\n"
            "assert 'torch' not in sys.modules, 'torch imported for --help'\nprint('ok')")
    res = run_module(["-c", code])
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_python_m_trainer_train_help_imports_no_torch():
    res = run_module(["-c", "import sys\nfrom hylo.trainer.train import main\n"
                            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                            "assert 'torch' not in sys.modules"])
    assert res.returncode == 0, res.stderr[-2000:]


def test_print_config_shows_the_resolved_config_and_exits(run):
    res = run_module(["-m", "hylo.trainer.train", "--print-config", f"run.dir={run}", "train.steps=7"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "d_model: 64" in res.stdout and "steps: 7" in res.stdout  # the run's own shape, this command's steps
    assert "[hylo] 0." not in res.stdout  # nothing was built


def test_a_cpu_run_too_big_for_memory_is_refused_with_the_plan(tmp_path):
    """~7B parameters on this box: one line with the plan's numbers, exit 2, nothing allocated, no run dir."""
    run = tmp_path / "run"
    res = run_module(["-m", "hylo.trainer.train", f"run.dir={run}", "model.d_model=4096", "model.n_layers=32",
                      "train.device=cpu"], timeout=120)
    assert res.returncode == 2 and "this CPU run needs about" in res.stderr and "GiB of host memory" in res.stderr
    assert "hylo plan --cpu" in res.stderr and "Traceback" not in res.stderr and not run.exists()


def test_hylo_plan_plans_cpu_runs():
    fits = run_module(["-m", "hylo.trainer.cli", "plan", "--cpu", "--gpu-mem", "8"])
    assert fits.returncode == 0 and "CPU rank(s) with 8.0 GiB of host memory" in fits.stdout
    assert "full logits: fp32" in fits.stdout and "the process (torch, Python, data)" in fits.stdout
    tight = run_module(["-m", "hylo.trainer.cli", "plan", "--cpu", "--gpu-mem", "2.5", "train.seq_len=8192",
                        "train.batch_size=4", "train.loss_chunk=0"])
    assert tight.returncode == 1 and "does NOT fit" in tight.stdout and "it fits with" in tight.stdout, tight.stdout
    assert "activation_offload" not in tight.stdout  # not a CPU remedy


def test_dry_run_builds_reads_a_batch_and_leaves_nothing(tmp_path, run):
    fresh = tmp_path / "fresh"
    res = run_module(["-m", "hylo.trainer.train", "--dry-run", f"run.dir={fresh}", *SMALL])
    assert res.returncode == 0 and "dry run: 0.37M parameters" in res.stdout and "first batch (1, 4, 65)" in res.stdout
    assert not fresh.exists()
    resumed = run_module(["-m", "hylo.trainer.train", "--dry-run", "--resume", f"run.dir={run}"])
    assert resumed.returncode == 0 and "would resume from" in resumed.stdout, resumed.stderr[-2000:]
