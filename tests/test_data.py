import json

import numpy as np
import pytest
import torch

from hylo.trainer.config import DataConfig
from hylo.trainer.data.loader import DataLoader
from hylo.trainer.data.packing import SequencePacker
from hylo.trainer.data.sources import DocumentStream, bundled_corpus_files, resolve_source
from hylo.trainer.data.tokenizer import EOS, load_tokenizer, train_bpe
from hylo.trainer.errors import DataError

TOK = load_tokenizer()


def write_corpus(tmp_path, n=40):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(5, 60)))) + f" doc{i}" for i in range(n)]
    for i, d in enumerate(docs):
        (tmp_path / f"d{i:03d}.txt").write_text(d)
    return docs


def test_bundled_corpus_is_real_text_with_stable_holdout():
    train, val = bundled_corpus_files("train"), bundled_corpus_files("val")
    assert len(train) > 500 and 0 < len(val) < len(train) / 10 and not set(train) & set(val)
    assert any(f.endswith("/os.py") for f in train + val)


def test_missing_and_empty_paths_fail_clearly(tmp_path):
    with pytest.raises(DataError, match=r"data.path '/no/such/dir' does not exist.*data.format=hf"):
        resolve_source(DataConfig(path="/no/such/dir"))
    with pytest.raises(DataError, match="holds no data files"):
        resolve_source(DataConfig(path=str(tmp_path)))
    with pytest.raises(DataError, match="matches no files"):
        resolve_source(DataConfig(path=str(tmp_path / "*.jsonl")))


def test_packing_reproduces_the_token_stream(tmp_path):
    docs = write_corpus(tmp_path)
    stream = DocumentStream(DataConfig(path=str(tmp_path)), seed=3)
    texts = [text for _, (epoch, _, text) in zip(range(len(docs)), stream.iterate(), strict=False)]
    assert sorted(texts) == sorted(docs)  # one epoch is every document once, in a seeded order
    expected = np.concatenate([TOK.encode(t).ids + [TOK.token_to_id(EOS)] for t in texts])
    packer = SequencePacker(DocumentStream(DataConfig(path=str(tmp_path)), seed=3), TOK, seq_len=16)
    seqs = [packer.next_sequence() for _ in range(len(expected) // 16 - 1)]
    for g, seq in enumerate(seqs):
        assert len(seq) == 17
        np.testing.assert_array_equal(seq, expected[16 * g : 16 * g + 17])


def test_ranks_partition_the_global_batch(tmp_path):
    write_corpus(tmp_path)
    cfg = DataConfig(path=str(tmp_path), prefetch=0)
    one = DataLoader(cfg, TOK, seq_len=8, global_batch=8, micro_batch=4, seed=1)
    shards = [DataLoader(cfg, TOK, seq_len=8, global_batch=8, micro_batch=2, rank=r, world=2, seed=1) for r in (0, 1)]
    for _ in range(3):
        full = next(one).reshape(8, 9)
        parts = [next(s).reshape(4, 9) for s in shards]
        torch.testing.assert_close(torch.cat(parts), full)
    assert shards[0].state_dict() == shards[1].state_dict() == one.state_dict()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_is_exact(tmp_path, prefetch):
    write_corpus(tmp_path, n=15)  # small: several epochs pass
    cfg = DataConfig(path=str(tmp_path), prefetch=prefetch)
    straight = DataLoader(cfg, TOK, seq_len=32, global_batch=4, micro_batch=2, seed=5)
    batches = [next(straight) for _ in range(12)]
    first = DataLoader(cfg, TOK, seq_len=32, global_batch=4, micro_batch=2, seed=5)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # the state must survive JSON
    first.close()
    resumed = DataLoader(cfg, TOK, seq_len=32, global_batch=4, micro_batch=2, seed=5)
    resumed.load_state_dict(state)
    for expected in batches[5:]:
        torch.testing.assert_close(next(resumed), expected)
    assert resumed.state_dict()["packer"]["epoch"] >= 1
    straight.close()
    resumed.close()


def test_jsonl_and_parquet_sources(tmp_path):
    pa = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    rows = [{"content": f"document number {i} " * (i + 1)} for i in range(10)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pa.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "b.parquet")
    for name in ("a.jsonl", "b.parquet"):
        cfg = DataConfig(path=str(tmp_path / name), text_field="content")
        texts = [t for _, (_, _, t) in zip(range(10), DocumentStream(cfg, 0).iterate(), strict=False)]
        assert sorted(texts) == sorted(r["content"] for r in rows)
    with pytest.raises(DataError, match="no field 'text'"):
        next(DocumentStream(DataConfig(path=str(tmp_path / "a.jsonl")), 0).iterate())


def test_train_bpe_roundtrip(tmp_path):
    tok = train_bpe(["hello world, hello hylo"] * 50, vocab_size=300, out=tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.decode(again.encode("hello hylo").ids) == "hello hylo" and tok.token_to_id(EOS) == 0
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(DataError, match="hylo tokenize"):
        load_tokenizer(tmp_path / "missing.json")


def test_bundled_corpus_reads_through_a_whole_epoch():
    # Every bundled file must decode (the stdlib ships latin-1 test files) and the epoch must end cleanly.
    stream = DocumentStream(DataConfig(), seed=0)
    n_docs = sum(1 for _ in iter_one_epoch(stream))
    assert n_docs == len(bundled_corpus_files("train"))


def iter_one_epoch(stream):
    for epoch, _, text in stream.iterate():
        if epoch > 0:
            return
        assert isinstance(text, str)
        yield text


def test_a_dataset_saved_with_save_to_disk_streams_and_resumes_exactly(tmp_path):
    """`Dataset.save_to_disk` folders (and a DatasetDict's split) are read as they are, resumed mid-document."""
    from datasets import Dataset, DatasetDict

    (tmp_path / "raw").mkdir()
    docs = write_corpus(tmp_path / "raw", n=30)
    Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_dict({"body": docs}), "test": Dataset.from_dict({"body": docs[:2]})}
                ).save_to_disk(str(tmp_path / "dict"))
    for path, split in ((tmp_path / "saved", "train"), (tmp_path / "dict", "train")):
        cfg = DataConfig(path=str(path), text_field="body", hf_split=split, prefetch=0)
        assert resolve_source(cfg)[0] == "saved"
        read = [text for _, (_, _, text) in zip(range(30), DocumentStream(cfg, seed=0).iterate(), strict=False)]
        assert read == docs  # every document, in the saved order

        def loader(c=cfg):
            return DataLoader(c, TOK, seq_len=16, global_batch=2, micro_batch=2)

        straight = loader()
        batches = [next(straight).clone() for _ in range(6)]
        first = loader()
        for _ in range(3):
            next(first)
        state = first.state_dict()  # mid-document: 16-token windows of 5-60-word documents
        resumed = loader()
        resumed.load_state_dict(state)
        for expected in batches[3:]:
            assert torch.equal(next(resumed), expected)
        for one in (straight, first, resumed):
            one.close()
    with pytest.raises(DataError, match=r"has splits \['test', 'train'\], not 'valid'; set data.hf_split"):
        next(DocumentStream(DataConfig(path=str(tmp_path / "dict"), hf_split="valid"), seed=0).iterate())
