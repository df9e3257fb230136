"""A run's lineage is never mixed or overwritten (tests of what a fault campaign found):

- the config a resume continues with comes from the checkpoint that verifies and loads, never from a rejected one;
- a key that changes the data order (train.seed, ...) is refused by name on resume, and every config key has a
  rule for what a resume does with it;
- a resume of another run's checkpoint never writes over a run dir holding a third run's checkpoints (refused by
  name, or moved aside when asked), continues in the checkpoint's own run dir when no run.dir is given, and
  metrics.jsonl holds each step once;
- bad arguments end in one line and exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from hylo.trainer.arguments import parse
from hylo.trainer.checkpointing.resume import RESUME_RULES, resume_rule
from hylo.trainer.config import load_config
from tests.conftest import run_module

# MQAR: no corpus to read, a few seconds a run
RUN = ["data.format=mqar", "data.mqar.n_keys=32", "data.mqar.n_values=32", "model.vocab_size=128",
       "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.pattern=[baseconv,full]", "train.seq_len=32",
       "train.batch_size=8", "data.prefetch=0", "logging.interval=1", "logging.progress=false",
       "logging.sink_interval=0", "logging.layer_interval=0", "train.deterministic=true", "checkpoint.interval=2"]


def train(*args: str, cwd: Path | None = None):
    return run_module(["-m", "hylo.trainer.train", *args], **({"cwd": cwd} if cwd else {}), timeout=600)


def rows(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def state(step_folder: Path) -> dict:
    return json.loads((step_folder / "trainer_state.json").read_text())


def test_the_config_comes_from_the_checkpoint_that_verifies(tmp_path):
    run = tmp_path / "run"
    assert train(f"run.dir={run}", "train.steps=4", *RUN).returncode == 0
    newest = run / "checkpoints" / "step_4" / "trainer_state.json"
    edited = json.loads(newest.read_text())
    edited["config"]["train"]["lr"] *= 10  # valid JSON, a plausible value: only the checksum can tell
    newest.write_text(json.dumps(edited))
    res = train("--resume", f"run.dir={run}", "train.steps=6")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert f"resuming with the config {run / 'checkpoints' / 'step_2'} was trained with" in out
    assert "skipping checkpoint" in out and "step_4" in out
    assert "train.lr" not in out  # no "settings where they differ": the config is step_2's own
    lr = load_config(run / "config.yaml").train.lr
    assert lr == state(run / "checkpoints" / "step_2")["config"]["train"]["lr"] == 3e-3
    assert state(run / "checkpoints" / "step_6")["config"]["train"]["lr"] == lr


def test_a_damaged_newer_checkpoint_with_other_settings_is_refused_by_name(tmp_path):
    run = tmp_path / "run"
    assert train(f"run.dir={run}", "train.steps=2", *RUN).returncode == 0
    assert train("--resume", f"run.dir={run}", "train.steps=4", "train.lr=1e-3").returncode == 0
    shard = next((run / "checkpoints" / "step_4").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # its trainer state (lr 1e-3) verifies; its weights do not
    shard.write_bytes(bytes(data))
    res = train("--resume", f"run.dir={run}", "train.steps=6")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "failed verification" in res.stderr and "hylo train --resume" in res.stderr
    assert str(run / "checkpoints" / "step_2") in res.stderr and "train.lr" in res.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4"]  # nothing lost
    named = train("--resume", str(run / "checkpoints" / "step_2"), "train.steps=3")
    assert named.returncode == 0, named.stderr[-3000:]  # as the message says: step_2 with its own settings
    assert state(run / "checkpoints" / "step_3")["config"]["train"]["lr"] == 3e-3


def test_every_config_key_has_a_resume_rule():
    record = OmegaConf.to_container(OmegaConf.structured(load_config(None, [])))

    def keys(node: dict, prefix: str = ""):
        for key, value in node.items():
            yield from keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"]

    every = list(keys(record))
    assert len(every) > 100
    assert [key for key in every if resume_rule(key) is None] == []
    assert resume_rule("train.seed").startswith("refused")
    assert all(resume_rule(key) for key in RESUME_RULES)


def test_a_seed_change_on_resume_is_refused_by_name(tmp_path):
    run = tmp_path / "run"
    assert train(f"run.dir={run}", "train.steps=2", *RUN).returncode == 0
    res = train("--resume", f"run.dir={run}", "train.steps=4", "train.seed=7")
    assert res.returncode == 2 and "train.seed 0 -> 7" in res.stderr and "Traceback" not in res.stderr
    assert not (run / "checkpoints" / "step_4").exists()
    allowed = train("--resume", f"run.dir={run}", "train.steps=4", "train.seed=7", "data.allow_source_change=true")
    assert allowed.returncode == 0 and "train.seed 0 -> 7" in allowed.stdout, allowed.stderr[-3000:]


def test_resuming_another_runs_checkpoint_never_writes_over_a_third_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(f"run.dir={a}", "train.steps=2", *RUN).returncode == 0
    assert train(f"run.dir={b}", "train.steps=4", "train.seed=1", *RUN).returncode == 0
    b_state = state(b / "checkpoints" / "step_4")
    a_step = a / "checkpoints" / "step_2"
    refused = train("--resume", str(a_step), f"run.dir={b}", "train.steps=4")
    assert refused.returncode == 2 and "holds another run's checkpoints" in refused.stderr, refused.stderr[-3000:]
    assert "checkpoint.overwrite=true" in refused.stderr
    assert state(b / "checkpoints" / "step_4") == b_state  # untouched

    moved = train("--resume", str(a_step), f"run.dir={b}", "train.steps=4", "checkpoint.overwrite=true")
    assert moved.returncode == 0, moved.stderr[-3000:]
    (aside,) = (b / "superseded").iterdir()
    assert state(aside / "checkpoints" / "step_4") == b_state  # moved aside, not lost
    assert rows(aside)[-1]["step"] == 4
    assert state(b / "checkpoints" / "step_4")["lineage"] == state(a_step)["lineage"] != b_state["lineage"]
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step_4"]
    assert [r["step"] for r in rows(b) if "train/loss" in r] == [3, 4]

    # the permission was that command's: resuming b later does not inherit it from b's checkpoints
    again = train("--resume", f"run.dir={b}", "train.steps=5")
    assert again.returncode == 0, again.stderr[-2000:]
    assert state(b / "checkpoints" / "step_4")["config"]["checkpoint"]["overwrite"] is True
    assert state(b / "checkpoints" / "step_5")["config"]["checkpoint"]["overwrite"] is False

    # no run.dir: the checkpoint's own run dir (never the default runs/<name> in the working directory)
    own = train("--resume", str(a_step), "train.steps=3", cwd=tmp_path)
    assert own.returncode == 0, own.stderr[-3000:]
    assert (a / "checkpoints" / "step_3").is_dir() and not (tmp_path / "runs").exists()
    assert state(a / "checkpoints" / "step_3")["lineage"] == state(a_step)["lineage"]


def test_metrics_hold_each_step_once_after_a_resume_redoes_steps(tmp_path):
    run = tmp_path / "run"
    assert train(f"run.dir={run}", "train.steps=4", *RUN).returncode == 0
    res = train("--resume", str(run / "checkpoints" / "step_2"), "train.steps=5")
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [r["step"] for r in rows(run) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5]
    assert [r["step"] for r in rows(run, "metrics.superseded.jsonl") if "train/loss" in r] == [3, 4]
    assert "moved to" in res.stdout


def test_overrides_on_both_sides_of_resume():
    args = parse("train", ["train.steps=3", "--resume", "runs/x/checkpoints/step_2", "model.d_model=32"])
    assert args.overrides == ["train.steps=3", "model.d_model=32", "checkpoint.resume=runs/x/checkpoints/step_2"]
    res = run_module(["-m", "hylo.trainer.cli", "train", "train.steps=3", "--print-config", "train.lr=0.5"])
    assert res.returncode == 0 and "lr: 0.5" in res.stdout and "steps: 3" in res.stdout, res.stderr


def test_a_malformed_override_is_one_line():
    for bad in ("train.lr=[1,", "data.sources=[{name: a, path: x}"):
        res = run_module(["-m", "hylo.trainer.cli", "train", "--dry-run", bad])
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert f"override '{bad}'" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_split_that_holds_out_every_document_says_so(tmp_path):
    from hylo.trainer.data.sources import held_out

    docs = [text for text in (f"document number {i}\n" for i in range(200)) if held_out(text, 0.99)][:3]
    for i, text in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(text)
    res = train(f"run.dir={tmp_path / 'run'}", f"data.path={tmp_path}", "data.val_fraction=0.99", "train.steps=1",
                "logging.progress=false")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "train split" in res.stderr and "is empty" in res.stderr and "all 3 of its documents" in res.stderr
    assert "Lower data.val_fraction" in res.stderr


def test_generate_refuses_bad_numbers_and_an_empty_prompt(tmp_path):
    cases = {("--temperature", "nan"): "--temperature >= 0", ("--max-new-tokens", "-5"): "--max-new-tokens -5",
             ("--prompt", ""): "--prompt is empty"}
    for extra, message in cases.items():
        args = ["--prompt", "x", *extra] if extra[0] != "--prompt" else list(extra)
        res = run_module(["-m", "hylo.trainer.cli", "generate", "--checkpoint", str(tmp_path), *args])
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, (extra, res.stderr)


def test_held_out_documents_are_counted_and_an_empty_validation_split_says_what_to_do(tmp_path):
    from hylo.trainer.data.sources import held_out

    texts = [f"note {i}: some words to train on\n" for i in range(400)]
    kept = [t for t in texts if not held_out(t, 0.2)][:20]
    out = [t for t in texts if held_out(t, 0.2)][:5]
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(kept + out):
        (data / f"{i:02d}.txt").write_text(text)
    small = ["model.d_model=32", "model.n_layers=2", "train.seq_len=32", "train.batch_size=2", "logging.progress=false"]
    res = train(f"run.dir={tmp_path / 'run'}", f"data.path={data}", "data.val_fraction=0.2", "train.steps=2", *small)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "data.val_fraction=0.2: documents whose text hashes under that fraction are held out" in res.stdout
    assert f"the first epoch of 25 files under {data} held out 5 of 25 documents for validation" in res.stdout
    assert "step 2/2: loss" in res.stdout  # logging.progress=false: one line per logging step

    for i in range(20, 25):
        (data / f"{i:02d}.txt").unlink()  # only training documents left: the validation split is empty
    none = train(f"run.dir={tmp_path / 'none'}", f"data.path={data}", "data.val_fraction=0.2", "train.steps=1",
                 "checkpoint.interval=1", "data.allow_source_change=true", *small)
    assert none.returncode == 0, none.stderr[-2000:]
    ev = run_module(["-m", "hylo.trainer.cli", "eval", "--checkpoint", str(tmp_path / "none"), "--batches", "1",
                     "--batch-size", "1"])
    assert ev.returncode == 2 and "Traceback" not in ev.stderr, ev.stderr[-2000:]
    assert f"the val split of 20 files under {data} is empty" in ev.stderr and "--data PATH" in ev.stderr


def test_a_document_masking_change_on_resume_is_said(tmp_path):
    run = tmp_path / "run"
    small = ["model.d_model=32", "model.n_layers=2", "train.seq_len=32", "train.batch_size=2", "logging.progress=false",
             "checkpoint.interval=2"]
    assert train(f"run.dir={run}", "train.steps=2", *small).returncode == 0
    res = train("--resume", f"run.dir={run}", "train.steps=3", "data.document_masking=true")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "data.document_masking False -> True" in res.stdout
