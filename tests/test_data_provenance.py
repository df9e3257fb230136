"""The data a checkpoint was taken on is recorded and checked: a resume on changed files is refused by name (or,
opted in, goes on with a warning), and a file that disappears or cannot be parsed mid-stream is one clear error."""

import shutil

import pytest

from hylo.trainer.config import DataConfig
from hylo.trainer.data.provenance import check_source, data_provenance, source_change
from hylo.trainer.data.sources import DocumentStream, bundled_corpus_files
from hylo.trainer.data.tokenizer import load_tokenizer
from hylo.trainer.errors import DataError
from tests.conftest import run_module
from tests.test_checkpoint import SMALL


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, f in enumerate(bundled_corpus_files()[:12]):
        shutil.copy(f, folder / f"doc_{i:02d}.py")
    return folder


def test_provenance_names_removed_added_and_changed_files(corpus):
    tok = load_tokenizer("")
    cfg = DataConfig(path=str(corpus))
    before = data_provenance(cfg, tok)
    assert before["kind"] == "files" and before["n_files"] == 12
    assert source_change(before, data_provenance(cfg, tok)) is None
    (corpus / "doc_03.py").unlink()
    (corpus / "new.py").write_text("x = 1\n")
    with (corpus / "doc_05.py").open("a") as f:
        f.write("# appended\n")
    change = source_change(before, data_provenance(cfg, tok))
    assert "doc_03.py was removed" in change and "new.py was added" in change and "doc_05.py changed size" in change
    with pytest.raises(DataError, match="data.allow_source_change=true"):
        check_source(before, data_provenance(cfg, tok), "step_4", allow=False)
    assert "WARNING" in check_source(before, data_provenance(cfg, tok), "step_4", allow=True)


def test_a_file_removed_mid_stream_is_named(corpus):
    stream = DocumentStream(DataConfig(path=str(corpus)), seed=0).iterate()
    next(stream)
    for f in corpus.iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"cannot read data file '.*doc_\d+\.py'"):
        for _ in range(20):
            next(stream)


def test_data_removed_while_training_is_one_line_and_exit_1(tmp_path):
    """A failure while running exits 1 (the README's rule), with one line naming the file and no traceback."""
    corpus = tmp_path / "small"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc_{i:02d}.txt").write_text(f"document {i} " + "some words of text " * 30)
    res = run_module(["-m", "tests.fault_run", f"run.dir={tmp_path / 'run'}", f"data.path={corpus}",
                      "train.steps=60", "data.prefetch=0", "checkpoint.interval=0", *SMALL],
                     env={"HYLO_FAULT": "delete_data:2"})
    assert res.returncode == 1, res.stderr[-2000:]
    assert "cannot read data file" in res.stderr and "doc_" in res.stderr and "Traceback" not in res.stderr


def test_resume_on_changed_data_is_refused_unless_allowed(corpus, tmp_path):
    run = tmp_path / "run"
    args = ["-m", "hylo.trainer.train", f"run.dir={run}", f"data.path={corpus}", "checkpoint.interval=2", *SMALL]
    first = run_module([*args, "train.steps=2"])
    assert first.returncode == 0, first.stderr[-2000:]
    same = run_module([*args, "train.steps=3"])  # unchanged data: not a word about it
    assert same.returncode == 0 and "data changed" not in same.stdout + same.stderr
    (corpus / "doc_07.py").unlink()
    refused = run_module([*args, "train.steps=4"])
    assert refused.returncode == 2 and "doc_07.py was removed" in refused.stderr
    allowed = run_module([*args, "train.steps=4", "data.allow_source_change=true"])
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "WARNING: the data changed since" in allowed.stdout


def test_token_shard_truncated_while_reading_is_an_error_not_sigbus(tmp_path):
    from hylo.trainer.data.shards import TokenShards, write_shards

    tok = load_tokenizer("")
    texts = (open(f, encoding="utf-8", errors="replace").read() for f in bundled_corpus_files()[:20])
    write_shards(texts, tok, tmp_path, shard_tokens=5_000)
    shards = TokenShards(tmp_path, tok)
    assert len(shards.files) >= 2
    first = shards.slice(0, 100)
    assert len(first) == 100
    victim, _ = shards.files[-1]
    with open(victim, "r+b") as f:
        f.truncate(16)
    with pytest.raises(DataError, match="shrank while training read it"):
        shards.slice(shards.total - 50, shards.total)
