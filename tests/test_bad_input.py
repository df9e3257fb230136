"""Bad input is one line naming what is wrong, exit 2, and no stray run dir."""

import pytest

from hylo.trainer.arguments import parse
from tests.conftest import run_module


def train(*args):
    return run_module(["-m", "hylo.trainer.train", "train.steps=1", "logging.progress=false", *args], timeout=300)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1,\n")
    res = train("--config", str(bad))
    assert res.returncode == 2 and f"{bad}:3:1 is not valid YAML" in res.stderr
    assert "Traceback" not in res.stderr


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = train(f"run.dir={blocker / 'run'}")
    assert res.returncode == 2 and "cannot be written" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("content, message", [
    ("", "holds no text"),
    ('{"text": "fine"}\n{"text": "broken\n', "data.jsonl, line 2 is not valid JSON"),
    ('{"body": "no text field"}\n', "have no field 'text'"),
], ids=["empty", "malformed-jsonl", "no-text-field"])
def test_bad_data_fails_before_the_run_dir_exists(tmp_path, content, message):
    data = tmp_path / ("data.txt" if not content else "data.jsonl")
    data.write_text(content)
    run = tmp_path / "run"
    res = train(f"run.dir={run}", f"data.path={data}")
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not run.exists()


@pytest.mark.parametrize("binary", ["random-bytes", "executable"])
def test_binary_files_are_not_training_text(tmp_path, binary):
    """200 KB of random bytes named .txt, or a copy of a program, among good text files: refused by name, exit 2."""
    import os
    import sys

    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        (data / f"good{i}.txt").write_text(f"plain text file {i}\n" * 50)
    bad = data / "bad.txt"
    bad.write_bytes(os.urandom(200_000) if binary == "random-bytes" else open(sys.executable, "rb").read())
    run = tmp_path / "run"
    res = train(f"run.dir={run}", f"data.path={data}")
    assert res.returncode == 2 and f"data file {bad} is not text" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not run.exists()


@pytest.mark.parametrize("args, message", [
    (["train.lr=nan"], "train.lr=nan is not a finite number"),
    (["optim.betas=[0.9,inf]"], "optim.betas=[0.9, inf] is not a finite number"),
    (["--resume", "/nonexistent/step_5"], "checkpoint '/nonexistent/step_5' does not exist"),
], ids=["lr-nan", "beta-inf", "resume-missing"])
def test_refused_starts_leave_no_run_dir(tmp_path, args, message):
    run = tmp_path / "run"
    res = train(f"run.dir={run}", *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and not run.exists()


def test_resume_does_not_swallow_an_override():
    assert parse("train", ["--resume", "train.lr=1e-3"]).overrides == ["train.lr=1e-3", "checkpoint.resume=auto"]
    assert parse("train", ["--resume=runs/x/step_5", "train.steps=9"]).overrides == [
        "train.steps=9", "checkpoint.resume=runs/x/step_5"]


def test_tokenizer_smaller_than_asked_says_so(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("hello world hello\n")
    res = run_module(["-m", "hylo.trainer.cli", "tokenize", "--input", str(text), "--vocab-size", "32000",
                      "--output", str(tmp_path / "tok.json")])
    assert res.returncode == 0 and "asked for --vocab-size 32000" in res.stdout


def test_eval_says_when_it_measures_on_the_bundled_split(capsys):
    from argparse import Namespace

    from hylo.models.lm import HybridLM
    from hylo.trainer.config import load_config
    from hylo.trainer.evaluation.evaluate import _eval_ppl

    cfg = load_config(None, ["model.d_model=32", "model.n_layers=1", "model.vocab_size=4096", "data.path=my/corpus"])
    args = Namespace(seq_len=32, batch_size=1, batches=1, bucket=0, data="bundled:val", checkpoint="ckpt")
    assert _eval_ppl(HybridLM(cfg.model).eval(), cfg, args) == 0
    assert "the model trained on my/corpus; perplexity is measured on the bundled" in capsys.readouterr().out


def test_a_binary_tail_past_the_sniffed_start_is_named_when_read(tmp_path):
    from hylo.trainer.config import DataConfig
    from hylo.trainer.data.sources import DocumentStream
    from hylo.trainer.errors import DataError

    (tmp_path / "good.txt").write_text("plain text\n" * 100)
    bad = tmp_path / "tail.txt"
    bad.write_bytes(b"text at the start\n" * 1000 + bytes(range(256)) * 100)  # binary after 18 KB of text
    stream = DocumentStream(DataConfig(path=str(tmp_path)), seed=0)
    stream.check_readable()  # the first 4 KB of each file are text
    with pytest.raises(DataError, match=f"data file {bad} is not text"):
        for _ in stream.iterate():
            pass


def test_tokenize_names_its_own_options(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "b.txt").write_text("hello\n")
    res = run_module(["-m", "hylo.trainer.cli", "tokenize", "--input", str(tmp_path), "--vocab-size", "300",
                      "--output", str(tmp_path / "t.json")])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--input mixes file kinds ['.jsonl', '.txt']" in res.stderr and "set --format" in res.stderr
    assert "data.path" not in res.stderr
