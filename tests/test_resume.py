"""Resume semantics: the new run's optimiser and schedule settings take effect (and are listed), shape changes are
refused by name, and the checkpoint's position (step, schedule, data) is kept."""

import json

from tests.conftest import run_module
from tests.test_checkpoint import SMALL, shards  # noqa: F401 - shards is a fixture
from trainer.config import load_config
from trainer.optim import lr_factor


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_changed_lr_on_resume_takes_effect(shards, tmp_path):  # noqa: F811
    args = ["-m", "trainer.train", f"run.dir={tmp_path}", f"data.path={shards}", "checkpoint.interval=3",
            "schedule.warmup_steps=2", *SMALL]
    first = run_module([*args, "train.steps=3"])
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_module([*args, "train.steps=6", "train.lr=1e-3", "optim.weight_decay=0.05"])
    assert second.returncode == 0, second.stderr[-2000:]
    assert "train.lr 0.003 -> 0.001" in second.stdout and "optim.weight_decay 0.1 -> 0.05" in second.stdout
    cfg = load_config(None, ["train.steps=6", "train.lr=1e-3", "schedule.warmup_steps=2"])
    rows = {r["step"]: r for r in metrics(tmp_path) if "train/lr" in r}
    for step in (4, 5, 6):  # logged after the scheduler's step: train.lr x the schedule at s
        assert abs(rows[step]["train/lr"] - 1e-3 * lr_factor(step, cfg)) < 1e-12, (step, rows[step])


def test_shape_change_on_resume_is_refused_by_name(shards, tmp_path):  # noqa: F811
    args = ["-m", "trainer.train", f"run.dir={tmp_path}", f"data.path={shards}", "checkpoint.interval=2", *SMALL]
    assert run_module([*args, "train.steps=2"]).returncode == 0
    res = run_module([*args, "train.steps=4", "model.n_layers=3"])
    assert res.returncode == 2 and "model.n_layers 2 -> 3" in res.stderr and "cannot change on resume" in res.stderr
