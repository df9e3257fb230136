"""data.val_fraction: a validation split of the user's own data — documents held out by a hash of their text,
never trained on, the same after any resume, recorded in the provenance, and what evaluation reads by default."""

import json

import pytest

from hylo.trainer.config import DataConfig, held_out_data, load_config
from hylo.trainer.data.loader import DataLoader
from hylo.trainer.data.provenance import data_provenance, source_change
from hylo.trainer.data.sources import DocumentStream
from hylo.trainer.data.tokenizer import load_tokenizer
from hylo.trainer.errors import DataError
from tests.conftest import run_module

TOK = load_tokenizer()


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(200):
        (folder / f"doc{i:03d}.txt").write_text(f"document {i}: " + "words of text " * (i % 7 + 3))
    return folder


def one_epoch(cfg: DataConfig) -> list[str]:
    texts = []
    for epoch, _, text in DocumentStream(cfg, seed=3).iterate():
        if epoch:
            return texts
        texts.append(text)
    return texts


def test_held_out_documents_are_never_trained_on(corpus):
    everything = one_epoch(DataConfig(path=str(corpus)))
    train = one_epoch(DataConfig(path=str(corpus), val_fraction=0.2))
    val = one_epoch(DataConfig(path=str(corpus), val_fraction=0.2, split="val"))
    assert not set(train) & set(val) and sorted(train + val) == sorted(everything)
    assert 20 <= len(val) <= 60  # about a fifth of 200
    assert one_epoch(DataConfig(path=str(corpus), val_fraction=0.2, split="val")) == val  # stable


def test_the_split_survives_a_resume(corpus):
    cfg = DataConfig(path=str(corpus), val_fraction=0.2, prefetch=0)
    straight = DataLoader(cfg, TOK, seq_len=16, global_batch=2, micro_batch=2, seed=1)
    want = [next(straight) for _ in range(30)]
    first = DataLoader(cfg, TOK, seq_len=16, global_batch=2, micro_batch=2, seed=1)
    got = [next(first) for _ in range(13)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = DataLoader(cfg, TOK, seq_len=16, global_batch=2, micro_batch=2, seed=1)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(17)]
    assert all((a == b).all() for a, b in zip(got, want, strict=True))


def test_the_fraction_is_part_of_the_provenance_and_token_shards_refuse_it(corpus, tmp_path):
    before = data_provenance(DataConfig(path=str(corpus), val_fraction=0.1), TOK)
    assert "val_fraction changed (0.1 -> 0.2)" in source_change(
        before, data_provenance(DataConfig(path=str(corpus), val_fraction=0.2), TOK))
    from hylo.trainer.data.shards import write_shards

    write_shards(["some text"] * 50, TOK, tmp_path / "shards")
    with pytest.raises(DataError, match="val_fraction holds out documents of a streaming source"):
        DataLoader(DataConfig(path=str(tmp_path / "shards"), val_fraction=0.1), TOK, seq_len=8, global_batch=1,
                   micro_batch=1)


def test_evaluation_reads_the_runs_own_held_out_documents(corpus, tmp_path):
    cfg = load_config(None, [f"data.path={corpus}", "data.val_fraction=0.2"])
    data, note = held_out_data(cfg)
    assert data.split == "val" and data.path == str(corpus) and note is None
    data, note = held_out_data(load_config(None, [f"data.path={corpus}"]))
    assert data.path == "bundled:val" and "set data.val_fraction" in note
    run = tmp_path / "run"
    res = run_module(["-m", "hylo.trainer.train", f"run.dir={run}", f"data.path={corpus}", "data.val_fraction=0.2",
                      "model.d_model=64", "model.n_layers=2", "train.batch_size=2", "train.seq_len=32",
                      "train.steps=2", "eval.interval=2", "eval.batches=1", "eval.batch_size=2",
                      "logging.progress=false"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "eval/loss" in res.stdout
    ev = run_module(["-m", "hylo.trainer.cli", "eval", "--checkpoint", str(run), "--batches", "1", "--batch-size", "2"])
    assert ev.returncode == 0 and "perplexity on the run's held-out documents" in ev.stdout, ev.stderr[-2000:]
