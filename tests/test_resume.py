"""Resume semantics: the new run's optimiser and schedule settings take effect (and are listed), shape changes are
refused by name, and the checkpoint's position (step, schedule, data) is kept."""

import json

import numpy as np

from hylo.trainer.config import load_config
from hylo.trainer.engines.optim import lr_factor
from tests.conftest import run_module
from tests.test_checkpoint import SMALL, shards  # noqa: F401 - shards is a fixture


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_changed_settings_on_resume(shards, tmp_path):  # noqa: F811
    args = ["-m", "hylo.trainer.train", f"run.dir={tmp_path}", f"data.path={shards}", "checkpoint.interval=3",
            "schedule.warmup_steps=2", *SMALL]
    first = run_module([*args, "train.steps=3"])
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_module([*args, "train.steps=6", "train.lr=1e-3", "optim.weight_decay=0.05", "model.window=32"])
    assert second.returncode == 0, second.stderr[-2000:]
    assert "train.lr 0.003 -> 0.001" in second.stdout and "optim.weight_decay 0.1 -> 0.05" in second.stdout
    assert "model settings that change what the model computes" in second.stdout
    assert "model.window 64 -> 32" in second.stdout
    cfg = load_config(None, ["train.steps=6", "train.lr=1e-3", "schedule.warmup_steps=2"])
    rows = {r["step"]: r for r in metrics(tmp_path) if "train/lr" in r}
    for step in (4, 5, 6):  # logged after the scheduler's step: train.lr x the schedule at s
        assert abs(rows[step]["train/lr"] - 1e-3 * lr_factor(step, cfg)) < 1e-12, (step, rows[step])
    # a setting that defines the parameters' shapes is refused by name
    res = run_module([*args, "train.steps=8", "model.n_layers=3"])
    assert res.returncode == 2 and "model.n_layers 2 -> 3" in res.stderr and "cannot change on resume" in res.stderr


def test_every_model_setting_has_a_resume_rule():
    """Each model key is refused (shape), noted (changes the function) or neutral on resume: a new key must pick."""
    import dataclasses

    from hylo.trainer.checkpointing.resume import COMPUTE_KEYS, NEUTRAL_MODEL_KEYS, SHAPE_KEYS
    from hylo.trainer.config import ModelConfig

    def keys(node, prefix):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            yield from keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]

    rules = [*SHAPE_KEYS, *COMPUTE_KEYS, *NEUTRAL_MODEL_KEYS]
    assert sorted(rules) == sorted(keys(ModelConfig(), "model.")) and len(set(rules)) == len(rules)


def test_a_new_seq_len_continues_the_stream_at_the_same_token():
    """Long-context training in stages: a checkpoint taken at T=64 resumed at T=32 (and at T=128) reads on from the
    very token where the T=64 run would have, nothing skipped or repeated."""
    from hylo.trainer.config import DataConfig
    from hylo.trainer.data.loader import DataLoader
    from hylo.trainer.data.tokenizer import load_tokenizer

    tok = load_tokenizer("")

    def loader(t):
        return DataLoader(DataConfig(prefetch=0), tok, seq_len=t, global_batch=2, micro_batch=2)

    first = loader(64)
    for _ in range(3):
        next(first)
    state = first.state_dict()
    same = loader(64)
    same.load_state_dict(state)
    reference = next(same).reshape(-1, 65)  # the next two sequences at T=64: 128 new tokens (+1)
    stream = np.concatenate([reference[0, :64], reference[1]])
    for t in (32, 128):
        other = loader(t)
        other.load_state_dict(state)
        assert "nothing skipped or repeated" in other.resume_note
        rows = next(other).reshape(-1, t + 1)
        got = np.concatenate([rows[0, :t], rows[1]])[:129]
        n = min(len(got), len(stream))
        assert np.array_equal(got[:n], stream[:n]), t


def test_a_new_seq_len_on_token_shards_reads_the_rest_of_the_epoch_then_goes_on(tmp_path):
    """Token shards at T=64 interrupted mid-epoch, resumed at T=32 (and at T=128): the rest of the epoch's windows
    in their order, end to end, cut to the new length, then epoch 1 at the new length."""
    from hylo.trainer.data.shards import ShardSequences, TokenShards, write_shards
    from hylo.trainer.data.sources import bundled_corpus_files
    from hylo.trainer.data.tokenizer import load_tokenizer

    tok = load_tokenizer("")
    texts = (open(f, encoding="utf-8", errors="replace").read() for f in bundled_corpus_files()[:6])
    write_shards(texts, tok, tmp_path, shard_tokens=20_000)
    stream = TokenShards(tmp_path, tok)
    first = ShardSequences(stream, 64, seed=3)
    for _ in range(7):
        first.next_sequence()
    state = first.state_dict()
    reference = ShardSequences(stream, 64, seed=3)
    reference.load_state_dict(state, saved_seq_len=64)
    rest = np.concatenate([reference.next_sequence()[:64] for _ in range(first.n - 7)])
    for t in (32, 128):
        new = ShardSequences(stream, t, seed=3)
        new.load_state_dict(state, saved_seq_len=64)
        count = (len(rest) - 1) // t
        for i in range(count):
            assert np.array_equal(new.next_sequence(), rest[i * t:i * t + t + 1]), (t, i)
        assert new.carry is None  # the interrupted epoch is done: epoch 1 at the new length follows
        assert np.array_equal(new.next_sequence(), ShardSequences(stream, t, seed=3)._sequence(new.n)), t
        assert len(rest) - count * t < t + 1  # what was dropped: under one new window


def test_a_new_seq_len_on_token_shards_resumes_end_to_end(shards, tmp_path):  # noqa: F811
    args = ["-m", "hylo.trainer.train", f"run.dir={tmp_path}", f"data.path={shards}", "checkpoint.interval=2", *SMALL]
    assert run_module([*args, "train.steps=2"]).returncode == 0
    res = run_module([*args, "train.steps=4", "train.seq_len=32"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "train.seq_len 64 -> 32: the rest of the interrupted epoch" in res.stdout
