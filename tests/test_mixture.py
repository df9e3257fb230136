"""Data mixtures (trainer/data/mixture.py): weighted sources, long-document upsampling, exact resume, per-source
accounting, and clear refusals."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from hylo.trainer.config import DataConfig, SourceConfig, UpsampleConfig, load_config
from hylo.trainer.data.loader import DataLoader
from hylo.trainer.data.mixture import MixturePacker
from hylo.trainer.data.packing import source_packer
from hylo.trainer.data.tokenizer import load_tokenizer
from tests.conftest import run_module
from tests.test_checkpoint import losses

TOK = load_tokenizer()
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]


def write_source(folder, n_docs: int, words: tuple[int, int], tag: str, seed: int):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_docs):
        n = int(rng.integers(*words))
        (folder / f"{tag}{i:03d}.txt").write_text(f"{tag} document {i}: " + " ".join(rng.choice(WORDS, size=n)))
    return str(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    return {"web": write_source(root / "web", 60, (20, 200), "web", 0),
            "code": write_source(root / "code", 30, (20, 120), "code", 1),
            "books": write_source(root / "books", 4, (80, 200), "book", 2)}  # small: its epochs turn over


def mixture(corpus, weights=(0.7, 0.2, 0.1), **per_source) -> DataConfig:
    return DataConfig(prefetch=0, sources=[SourceConfig(name=n, path=corpus[n], weight=w, **per_source.get(n, {}))
                                           for n, w in zip(("web", "code", "books"), weights, strict=True)])


def packer_of(cfg: DataConfig, seq_len: int, say) -> MixturePacker:
    return MixturePacker(cfg, lambda source: source_packer(cfg, source, TOK, seq_len, 0), say=say)


def test_realised_shares_follow_the_weights(corpus):
    packer = packer_of(mixture(corpus), 8, say=lambda msg: None)
    for _ in range(10_000):
        packer.next_sequence(keep=False)
    counts = packer.step_sources()
    for name, weight in zip(("web", "code", "books"), (0.7, 0.2, 0.1), strict=True):
        assert abs(counts[name] / 10_000 - weight) <= 0.01, counts
    assert packer.epochs["books"] >= 1  # the small source went round its epoch on its own


def test_two_ranks_see_the_one_rank_batches(corpus):
    cfg = mixture(corpus)
    one = DataLoader(cfg, TOK, seq_len=16, global_batch=4, micro_batch=4, seed=2)
    two = [DataLoader(cfg, TOK, seq_len=16, global_batch=4, micro_batch=2, rank=r, world=2, seed=2) for r in (0, 1)]
    for _ in range(40):
        full = next(one).reshape(4, 17)
        torch.testing.assert_close(torch.cat([next(loader).reshape(2, 17) for loader in two]), full)
    assert two[0].state_dict() == two[1].state_dict() == one.state_dict()


def run_chain(cfg, stops, steps, notes=None):
    batches, state, step = [], None, 0
    for stop in [*stops, steps]:
        loader = DataLoader(cfg, TOK, seq_len=32, global_batch=2, micro_batch=2, seed=5)
        if state is not None:
            loader.load_state_dict(json.loads(json.dumps(state)))
        while step < stop:
            batches.append(next(loader))
            step += 1
        state = loader.state_dict()
        loader.close()
    return batches, state


def test_resume_mid_mixture_is_exact_across_the_small_sources_epochs(corpus):
    cfg = mixture(corpus, weights=(0.3, 0.3, 0.4))
    straight, end = run_chain(cfg, [], 120)
    assert end["packer"]["epochs"]["books"] >= 1  # the chain crosses an epoch boundary of the smallest source
    for stops in ([17, 18, 61], [40, 41, 42, 90]):
        chained, _ = run_chain(cfg, stops, 120)
        assert all(torch.equal(a, b) for a, b in zip(chained, straight, strict=True)), stops


def test_long_documents_appear_factor_times_per_epoch_never_back_to_back(corpus):
    cfg = mixture(corpus, weights=(1.0, 0.0, 0.0), web={"upsample_long": UpsampleConfig(min_tokens=300, factor=3)})
    packer = packer_of(cfg, 16, say=lambda msg: None).packers["web"]
    docs = packer._documents(0, None)
    stream = [next(docs) for _ in range(160)]
    keys = [tokens.tobytes() for _, _, tokens in stream]
    long_docs = {k for k in keys if len(np.frombuffer(k, np.int32)) - 1 >= 300}
    short_docs = set(keys) - long_docs
    assert long_docs and short_docs
    epochs = [e for e, _, _ in stream]
    assert epochs.count(0) > 60 and epochs[-1] >= 1  # the whole first epoch, and into the second
    first_epoch = Counter(k for e, k in zip(epochs, keys, strict=True) if e == 0)
    # where each document is first read: its ordinal among the epoch's originals
    first_at = {}
    for (e, resume, _), k in zip(stream, keys, strict=True):
        first_at.setdefault(k, (e, resume["ordinal"]))
    early = {k for k in long_docs if first_at[k][0] == 0 and first_at[k][1] < 60 - 2 * 16}  # copies fit the epoch
    assert early and all(first_epoch[k] == 3 for k in early), {first_at[k]: first_epoch[k] for k in early}
    assert all(first_epoch[k] == 1 for k in short_docs if first_at[k][0] == 0)
    assert all(a != b for a, b in zip(keys, keys[1:], strict=False)), "a document twice in a row"
    # the shaped stream resumes exactly from any of its points, pending copies re-read from their source state
    for cut in (5, 11, 23):
        _, resume, _ = stream[cut]
        again = packer._documents(stream[cut][0], json.loads(json.dumps(resume)))
        assert [next(again)[2].tobytes() for _ in range(10)] == keys[cut:cut + 10]


def test_min_doc_tokens_drops_short_documents(corpus):
    cfg = mixture(corpus, weights=(1.0, 0.0, 0.0), web={"min_doc_tokens": 150})
    packer = packer_of(cfg, 16, say=lambda msg: None).packers["web"]
    docs = packer._documents(0, None)
    assert all(len(next(docs)[2]) - 1 >= 150 for _ in range(15))


def test_new_weights_on_resume_take_effect_with_a_note(corpus):
    notes = []
    first = packer_of(mixture(corpus), 8, say=notes.append)
    for _ in range(500):
        first.next_sequence(keep=False)
    state = json.loads(json.dumps(first.state_dict()))
    second = packer_of(mixture(corpus, weights=(0.1, 0.1, 0.8)), 8, say=notes.append)
    second.load_state_dict(state)
    assert any("new source weights from sequence 500 on: web 0.7 -> 0.1" in n for n in notes)
    before = second.step_sources()
    for _ in range(1000):
        second.next_sequence(keep=False)
    after = second.step_sources()
    assert abs((after["books"] - before["books"]) / 1000 - 0.8) <= 0.01


def test_max_epochs_stops_a_source_and_redistributes(corpus):
    notes = []
    cfg = mixture(corpus, weights=(0.5, 0.0, 0.5), books={"max_epochs": 1})
    packer = packer_of(cfg, 64, say=notes.append)
    for _ in range(400):
        packer.next_sequence(keep=False)
    assert "books" in packer.exhausted and any("finished its max_epochs=1" in n for n in notes)
    books = packer.step_sources()["books"]
    for _ in range(50):
        packer.next_sequence(keep=False)
    assert packer.step_sources()["books"] == books  # no longer drawn


SOURCES = "data.sources=[{{name: web, path: {web}, weight: 0.6}}, {{name: books, path: {books}, weight: 0.4}}]"
TRAIN = ["model.d_model=64", "model.n_layers=2", "train.batch_size=4", "train.seq_len=64", "logging.interval=1",
         "logging.progress=false", "train.deterministic=true", "logging.sink_interval=0", "checkpoint.interval=3"]


def test_training_on_a_mixture_resumes_bit_exactly_and_logs_each_source(corpus, tmp_path):
    sources = SOURCES.format(**corpus)
    ref = tmp_path / "ref"
    res = run_module(["-m", "hylo.trainer.train", f"run.dir={ref}", sources, "train.steps=9", *TRAIN])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "data/tokens/web" in r][-1]
    assert last["data/tokens/web"] + last["data/tokens/books"] == 9 * 4 * 64
    chain = tmp_path / "chain"
    for stop in (4, 5, 9):
        res = run_module(["-m", "hylo.trainer.train", f"run.dir={chain}", sources, f"train.steps={stop}", *TRAIN])
        assert res.returncode == 0, res.stderr[-2000:]
    assert losses(chain) == losses(ref)
    # a source removed from the mixture is refused by name
    removed = run_module(["-m", "hylo.trainer.train", f"run.dir={chain}", "train.steps=12", *TRAIN,
                          f"data.sources=[{{name: web, path: {corpus['web']}, weight: 1.0}}]"])
    assert removed.returncode == 2 and "source 'books' was removed" in removed.stderr, removed.stderr[-2000:]


@pytest.mark.parametrize("sources, message", [
    ("[{name: a, path: x, weight: -1}]", "weight=-1.0 must be >= 0"),
    ("[{name: a, path: x, weight: 0}]", "every weight is 0"),
    ("[{name: a, path: x}, {name: a, path: y}]", "the name 'a' is used twice"),
    ("[{name: a, path: x, wieght: 1}]", "unknown key 'wieght' in a data.sources entry"),
], ids=["negative", "all-zero", "duplicate", "unknown-key"])
def test_bad_mixtures_are_one_line_errors(sources, message, tmp_path):
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [f"data.sources={sources}"])
    res = run_module(["-m", "hylo.trainer.train", f"run.dir={tmp_path / 'run'}", f"data.sources={sources}"])
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_the_two_stage_long_context_example_runs_and_resumes(corpus, tmp_path):
    """configs/longctx_stage{1,2}.yaml with this test's sources: stage 2 resumes stage 1 at 4x the length with
    upsampled long documents, saying what changed."""
    from tests.conftest import ROOT

    for stage in (1, 2):
        text = (ROOT / "configs" / f"longctx_stage{stage}.yaml").read_text()
        for name in ("web", "code", "books"):
            text = text.replace(f"data/{name}", corpus[name])
        (tmp_path / f"stage{stage}.yaml").write_text(text.replace("min_tokens: 512", "min_tokens: 100"))
    small = ["model.d_model=64", "logging.progress=false", "logging.sink_interval=0", f"run.dir={tmp_path / 'run'}"]
    one = run_module(["-m", "hylo.trainer.train", "--config", str(tmp_path / "stage1.yaml"), "train.steps=3",
                      "train.seq_len=32", *small])
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_module(["-m", "hylo.trainer.train", "--config", str(tmp_path / "stage2.yaml"), "train.steps=5",
                      "train.seq_len=128", *small])
    assert two.returncode == 0, two.stderr[-2000:]
    assert "resuming from" in two.stdout and "train.seq_len 32 -> 128" in two.stdout
    assert "new document shaping (min_doc_tokens, upsample_long, max_epochs) for web, code, books" in two.stdout


def test_a_mixture_trains_with_document_masking_under_context_parallelism(corpus, tmp_path, free_port):
    from tests.test_checkpoint import torchrun

    res = torchrun(2, free_port, [f"run.dir={tmp_path}", SOURCES.format(**corpus), "train.steps=3", *TRAIN,
                                  "parallel.cp=2", "data.document_masking=true"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data/tokens/web"] + rows[-1]["data/tokens/books"] == 3 * 4 * 64


def test_evaluation_on_a_mixture_reports_each_sources_loss(corpus, tmp_path):
    res = run_module(["-m", "hylo.trainer.train", f"run.dir={tmp_path}", SOURCES.format(**corpus), "train.steps=2",
                      *TRAIN,
                      "data.val_fraction=0.3", "eval.interval=2", "eval.batches=2", "eval.batch_size=4"])
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/loss" in r][-1]
    assert {"eval/loss/web", "eval/loss/books"} <= set(evals)
    ev = run_module(["-m", "hylo.trainer.cli", "eval", "--checkpoint", str(tmp_path), "--batches", "2",
                     "--batch-size", "4"])
    assert ev.returncode == 0 and "source web: loss" in ev.stdout and "source books: loss" in ev.stdout, ev.stderr


# ------------------------------------------------------------------------------- token-shard sources that shape
@pytest.fixture(scope="module")
def shard_corpus(corpus, tmp_path_factory):
    """The web source tokenized into shards of 1,500 tokens (documents straddle shard files), plus its documents'
    token lists (EOS included) in file order."""
    from pathlib import Path

    from hylo.trainer.data.shards import write_shards
    from hylo.trainer.data.tokenizer import EOS

    texts = [p.read_text() for p in sorted(Path(corpus["web"]).iterdir())]
    out = tmp_path_factory.mktemp("web_shards")
    write_shards(texts, TOK, out, shard_tokens=1_500)
    eos = TOK.token_to_id(EOS)
    docs = [enc.ids + [eos] for enc in TOK.encode_batch(texts, add_special_tokens=False)]
    return {**corpus, "web": str(out)}, docs


def test_token_shards_read_as_documents_are_the_tokenized_documents(shard_corpus, tmp_path):
    from hylo.trainer.data.shards import ShardDocuments, TokenShards
    from hylo.trainer.data.tokenizer import EOS

    _, docs = shard_corpus
    shards = TokenShards(shard_corpus[0]["web"], TOK)
    stream = ShardDocuments(shards, TOK.token_to_id(EOS), seed=3).iterate()
    epoch0 = [next(stream) for _ in range(len(docs))]
    assert sorted(tuple(t.tolist()) for _, _, t in epoch0) == sorted(map(tuple, docs))  # every document, once
    assert {e for e, _, _ in epoch0} == {0} and next(stream)[0] == 1
    # a resume from any document's state continues with the same documents
    again = ShardDocuments(shards, TOK.token_to_id(EOS), seed=3).iterate(0, json.loads(json.dumps(epoch0[17][1])))
    assert [next(again)[2].tolist() for _ in range(5)] == [t.tolist() for _, _, t in epoch0[17:22]]


def test_a_token_shard_source_shapes_its_documents_and_resumes_exactly(shard_corpus):
    corpus, docs = shard_corpus
    shaped = {"min_doc_tokens": 60, "upsample_long": UpsampleConfig(min_tokens=150, factor=3)}
    cfg = mixture(corpus, weights=(0.6, 0.2, 0.2), web=shaped)
    web = packer_of(cfg, 16, say=lambda msg: None).packers["web"]
    stream = web._documents(0, None)
    seen = Counter(tuple(next(stream)[2].tolist()) for _ in range(len(docs)))
    lengths = {tuple(d): len(d) - 1 for d in docs}
    assert all(lengths[d] >= 60 for d in seen)  # min_doc_tokens on shard documents
    assert any(n == 3 for d, n in seen.items() if lengths[d] >= 150)  # long ones upsampled
    assert all(n == 1 for d, n in seen.items() if lengths[d] < 150)
    straight, _ = run_chain(cfg, [], 60)
    for stops in ([7, 8, 33], [20, 41]):
        chained, _ = run_chain(cfg, stops, 60)
        assert all(torch.equal(a, b) for a, b in zip(chained, straight, strict=True)), stops


def test_a_token_shard_source_switching_to_documents_on_resume_starts_its_next_epoch(shard_corpus):
    corpus, _ = shard_corpus
    notes = []
    first = packer_of(mixture(corpus), 16, say=notes.append)
    for _ in range(50):
        first.next_sequence(keep=False)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["sources"]["web"]["kind"] == "tokens"  # unshaped shards: windows
    shaped = mixture(corpus, web={"min_doc_tokens": 60})
    second = packer_of(shaped, 16, say=notes.append)
    second.load_state_dict(state)
    assert any("token-shard source 'web' now reads documents" in n and "starts epoch 2" in n for n in notes), notes
    assert second.packers["web"].epoch() == 1 and second.next_index == 50
    for _ in range(20):
        second.next_sequence(keep=False)
    back = packer_of(mixture(corpus), 16, say=notes.append)  # and back to windows
    back.load_state_dict(json.loads(json.dumps(second.state_dict())))
    assert any("reads windows again" in n for n in notes) and back.packers["web"].epoch() == 2
    # a switch that reaches the source's max_epochs stops drawing from it, as running into it would
    capped = packer_of(mixture(corpus, web={"min_doc_tokens": 60, "max_epochs": 1}), 16, say=notes.append)
    capped.load_state_dict(json.loads(json.dumps(state)))
    assert "web" in capped.exhausted and any("'web' finished its max_epochs=1" in n for n in notes)


def test_skipping_other_ranks_rows_in_one_call_equals_one_by_one(shard_corpus):
    """Token-shard mixtures skip the other ranks' rows through the round robin's period in one index step per
    source: the same sources, positions, epochs and max_epochs stops as skipping sequence by sequence."""
    corpus, _ = shard_corpus
    from hylo.trainer.data.mixture import MixturePacker as Mixture
    from hylo.trainer.data.packing import source_packer as build_source
    from hylo.trainer.data.shards import write_shards

    small = shard_corpus[0]["web"] + "_small"  # a tiny source: its epochs turn over inside skipped runs
    from pathlib import Path
    write_shards([p.read_text() for p in sorted(Path(corpus["books"]).iterdir())], TOK, Path(small))
    cfg = DataConfig(prefetch=0, sources=[SourceConfig(name="web", path=corpus["web"], weight=0.7),
                                          SourceConfig(name="small", path=small, weight=0.2, max_epochs=3),
                                          SourceConfig(name="odd", path=corpus["web"], weight=0.1)])

    def build():
        return Mixture(cfg, lambda s: build_source(cfg, s, TOK, 16, 0), say=lambda msg: None)

    fast, slow = build(), build()
    assert fast._period is not None and len(fast._period) == 10
    bulk = Counter()
    for name, packer in fast.packers.items():
        packer.skip = lambda m, name=name, inner=packer.skip: (bulk.update([name]), inner(m))
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(0, 40))
        fast.skip(n)
        for _ in range(n):
            slow.next_sequence(keep=False)
        assert fast.state_dict() == slow.state_dict()
        np.testing.assert_array_equal(fast.next_sequence(), slow.next_sequence())
    assert "small" in fast.exhausted  # the stop happened inside the run, identically
    assert bulk["web"] > 100 and bulk["small"] > 10, bulk  # most runs were skipped in one step per source
    odd = MixturePacker(mixture(corpus, weights=(0.5123, 0.4877, 0.0)), lambda s: None, say=lambda msg: None)
    assert odd._period is None  # no short period: sequence by sequence


def test_a_longer_stage_on_text_sources_says_the_stream_continues_at_the_same_token(corpus):
    """Stage 2 of a long-context recipe (a mixture of text sources at 4x the length) continues each document
    stream at its token: the note says so, not the token-shard note about re-cut epochs."""
    cfg = mixture(corpus)
    short = DataLoader(cfg, TOK, seq_len=16, global_batch=4, micro_batch=4)
    for _ in range(3):
        next(short)
    state = short.state_dict()
    short.close()
    longer = DataLoader(cfg, TOK, seq_len=64, global_batch=4, micro_batch=4)
    assert not longer.reads_windows()
    longer.load_state_dict(state)
    assert "continues at the same token" in longer.resume_note and "epoch" not in longer.resume_note
    longer.close()
