"""Recall tasks and run insight: MQAR generator, loader and scoring (on a hand-built oracle and on a trained tiny
model), passkey needle placement and scoring on constructed logits, per-layer gradient and state norms, loss
spikes, the profiler window and `hylo report`."""

import json

import numpy as np
import pytest
import torch

from hylo.kernels.ops import based_linear_attention, lightning_attention
from hylo.models.lm import HybridLM
from hylo.trainer.callbacks.metrics import LossSpikes
from hylo.trainer.callbacks.monitors import layer_grad_norms
from hylo.trainer.config import ConfigError, ModelConfig, load_config
from hylo.trainer.data.mqar import IGNORE, MQARLoader, MQARSpec, mqar_batch
from hylo.trainer.data.tokenizer import load_tokenizer
from hylo.trainer.evaluation.recall import heatmap_image, mqar_accuracy, passkey_correct, passkey_sample
from tests.conftest import run_layer_monitor, run_module


class LookupOracle(torch.nn.Module):
    """Answers every MQAR query by looking the key up in the context: a perfect model, built by hand.
    With `wrong=True` it answers with the first value of the context instead."""

    def __init__(self, spec: MQARSpec, wrong: bool = False):
        super().__init__()
        self.spec, self.wrong = spec, wrong

    def forward(self, tokens, logits_at=None):
        logits = torch.zeros(*tokens.shape, self.spec.vocab)
        p = self.spec.pairs
        for b, row in enumerate(tokens.tolist()):
            table = dict(zip(row[0:2 * p:2], row[1:2 * p:2], strict=True))
            for t in range(2 * p, 4 * p, 2):
                logits[b, t, row[1] if self.wrong else table[row[t]]] = 1.0
        return logits if logits_at is None else logits[logits_at]  # HybridLM's contract


def test_mqar_sequences_are_well_formed():
    spec = MQARSpec(pairs=5, seq_len=24, n_keys=8, n_values=6)
    inputs, targets = mqar_batch(spec, 32, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (32, 24)
    keys, values = inputs[:, 0:10:2], inputs[:, 1:10:2]
    assert all(len(set(r)) == 5 for r in keys.tolist())  # distinct keys: every query has one answer
    assert bool(((keys >= 1) & (keys <= 8)).all()) and bool(((values >= 9) & (values <= 14)).all())
    asked = inputs[:, 10:20:2]
    assert sorted(asked[0].tolist()) == sorted(keys[0].tolist())  # each key asked once
    assert bool((inputs[:, 20:] == 0).all())  # padding
    scored = targets != IGNORE
    assert scored.sum(1).tolist() == [5] * 32 and bool(scored[:, 10:20:2].all())
    # the target at a query's position is the value stored with that key (and the next input token)
    assert torch.equal(targets[:, 10:20:2], inputs[:, 11:20:2])
    with pytest.raises(ValueError, match="needs seq_len >= 20"):
        mqar_batch(MQARSpec(pairs=5, seq_len=19), 1, torch.Generator())


def test_mqar_scoring_on_oracle_models():
    spec = MQARSpec(pairs=4, seq_len=20, n_keys=16, n_values=16)
    assert mqar_accuracy(LookupOracle(spec), spec, n=64, batch_size=16) == 1.0
    # the 'first value' model is right exactly where the answer equals the first stored value (the first key's
    # query, and other keys that happen to hold the same value), counted here on the same sequences
    generator = torch.Generator().manual_seed(1234)
    hits = 0
    for _ in range(4):
        inputs, targets = mqar_batch(spec, 16, generator)
        hits += int(((targets == inputs[:, 1:2]) & (targets != IGNORE)).sum())
    assert mqar_accuracy(LookupOracle(spec, wrong=True), spec, n=64, batch_size=16) == hits / (64 * 4)
    assert 0.25 <= hits / 256 < 0.5


def test_mqar_loader_layout_and_exact_resume():
    spec = MQARSpec(pairs=3, seq_len=16)
    whole = MQARLoader(spec, global_batch=8, micro_batch=2, rank=0, world=1, seed=5)
    first = next(whole)
    assert first.shape == (4, 2, 2, 17)
    tokens, targets = first[:, :, 0], first[:, :, 1]
    inputs, reference_targets = mqar_batch(spec, 8, torch.Generator().manual_seed(5 * 1_000_003))
    assert torch.equal(tokens[..., :-1].reshape(8, 16), inputs)
    assert torch.equal(targets[..., 1:].reshape(8, 16), reference_targets)  # shifted like the text loader's
    halves = [MQARLoader(spec, 8, 2, r, 2, seed=5) for r in range(2)]
    assert torch.equal(torch.cat([next(h).flatten(0, 1) for h in halves]), first.flatten(0, 1))
    state = whole.state_dict()
    later = next(whole)
    resumed = MQARLoader(spec, 8, 2, 0, 1, seed=5)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed), later)


def test_mqar_config_checks():
    with pytest.raises(ConfigError, match="needs train.seq_len >= 32"):
        load_config(None, ["data.format=mqar", "data.mqar.pairs=8", "train.seq_len=16"])
    with pytest.raises(ConfigError, match="smaller than MQAR's"):
        load_config(None, ["data.format=mqar", "model.vocab_size=64"])
    with pytest.raises(ConfigError, match="set eval.tasks=\\[mqar\\]"):
        load_config(None, ["data.format=mqar", "eval.interval=10"])
    with pytest.raises(ConfigError, match="not one of \\['ppl', 'mqar', 'passkey'\\]"):
        load_config(None, ["eval.tasks=[ppl,niah]"])


def test_tiny_attention_model_learns_mqar(tmp_path):
    """The easy setting of configs/mqar_tiny.yaml: a 2-layer model (short convolution + softmax attention)
    trained through `hylo train` reaches >= 0.9 accuracy, logged during training and re-measured by `hylo eval`."""
    res = run_module(["-m", "hylo.trainer.train", "--config", "configs/mqar_tiny.yaml", f"run.dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    accuracies = [r["eval/mqar_accuracy"] for r in rows if "eval/mqar_accuracy" in r]
    assert accuracies[-1] >= 0.9, accuracies
    ev = run_module(["-m", "hylo.trainer.cli", "eval", "--checkpoint", str(tmp_path / "checkpoints" / "step_300"),
                     "--task", "mqar", "--samples", "512"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads(ev.stdout.strip().splitlines()[-1])["accuracy"] >= 0.9


def test_passkey_needle_sits_where_it_says():
    tokenizer = load_tokenizer()
    rng = np.random.default_rng(0)
    for length in (80, 200):
        for depth in (0.0, 0.3, 1.0):
            s = passkey_sample(tokenizer, length, depth, rng)
            assert len(s.tokens) == length
            text = tokenizer.decode(s.tokens[s.needle_start:s.needle_start + s.needle_len].tolist())
            key = tokenizer.decode(s.answer.tolist()).strip()
            assert text.strip() == f"The pass key is {key}. Remember it. {key} is the pass key."
            filler = length - s.needle_len - len(s.answer) - len(tokenizer.encode("What is the pass key? The pass "
                                                                                    "key is").ids)
            assert s.needle_start == round(depth * filler)
            assert torch.equal(s.tokens[-len(s.answer):], s.answer)
    with pytest.raises(ValueError, match="shorter than the needle"):
        passkey_sample(tokenizer, 20, 0.5, rng)


def test_passkey_scoring_on_constructed_logits():
    s = passkey_sample(load_tokenizer(), 64, 0.5, np.random.default_rng(1))
    n, vocab = len(s.answer), 4096
    logits = torch.randn(64, vocab)
    logits[-n - 1:-1].scatter_(1, s.answer[:, None], 100.0)  # position t predicts token t + 1
    assert passkey_correct(logits, s)
    logits[-2, s.answer[-1]] = -100.0  # the last digit token wrong: the whole answer is wrong
    assert not passkey_correct(logits, s)
    image = heatmap_image(np.array([[0.0, 1.0]]))
    assert image.shape == (3, 16, 32) and image.dtype == np.uint8
    assert image[0, 0, 0] > image[1, 0, 0] and image[1, 0, 20] > image[0, 0, 20]  # red = 0, green = 1


def test_layer_gradient_norms_add_up_to_the_global_norm():
    model = HybridLM(ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, pattern=["full", "tnl", "based"]))
    tokens = torch.randint(0, 64, (2, 17))
    torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    norms = layer_grad_norms(model, 3)
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert sum(v * v for v in norms.values()) ** 0.5 == pytest.approx(float(total), rel=1e-6)
    assert all(v > 0 for v in norms.values())


def test_state_norms_are_the_kernels_final_states():
    model = HybridLM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, pattern=["tnl", "based"]))
    tokens = torch.randint(0, 64, (2, 24))
    captured = {}
    for i, block in enumerate(model.blocks):
        block.mixer.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args))
    with torch.no_grad():
        scalars = run_layer_monitor(model, "states", lambda: model(tokens))
        tnl, based = model.blocks[0].mixer, model.blocks[1].mixer
        q, k, v, _ = tnl._project(*captured[0])
        _, state = lightning_attention(q, k, v, tnl.slopes, output_final_state=True, backend="naive")
        assert scalars["states/layer0/norm"] == pytest.approx(float(state.norm(dim=(-2, -1)).mean()), rel=1e-4)
        _, (s, _) = based_linear_attention(*based._qkv(captured[1][0]), output_final_state=True, backend="naive")
        assert scalars["states/layer1/max_head"] == pytest.approx(float(s.norm(dim=(-2, -1)).mean(0).max()),
                                                                  rel=1e-4)
    assert sorted(scalars) == ["states/layer0/max_head", "states/layer0/norm", "states/layer1/max_head",
                               "states/layer1/norm"]


def test_loss_spikes_are_flagged():
    spikes = LossSpikes(zscore=6.0)
    rng = np.random.default_rng(0)
    flags = [spikes.update(3.0 + 0.01 * rng.standard_normal()) for _ in range(50)]
    assert flags == [None] * 50
    z = spikes.update(4.0)
    assert z is not None and z > 6
    assert spikes.update(3.0) is None
    assert LossSpikes(zscore=0).update(100.0) is None  # off


def test_profiler_monitoring_and_report(tmp_path):
    run = tmp_path / "run"
    res = run_module(["-m", "hylo.trainer.train", f"run.dir={run}", "model.pattern=[tnl,full]", "model.d_model=64",
                      "train.steps=8", "train.batch_size=4", "train.seq_len=64", "checkpoint.interval=8",
                      "logging.progress=false", "logging.interval=2", "logging.layer_interval=4",
                      "logging.sink_interval=4", "profile.enabled=true", "profile.start_step=2", "profile.steps=2",
                      "eval.interval=4", "eval.tasks=[ppl,passkey]", "eval.passkey_lengths=[64,96]",
                      "eval.passkey_depths=[0,1]", "eval.passkey_trials=1", "eval.batches=1"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert list((run / "tb" / "profile").glob("rank0*.pt.trace.json"))
    tags = set().union(*(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()))
    assert {"grads/layer0", "grads/layer1", "states/layer0/norm", "eval/passkey_accuracy",
            "eval/passkey/len000096/depth1.00", "sinks/layer1/first_token_mass/head0"} <= tags
    report = run_module(["-m", "hylo.trainer.cli", "report", str(run)])
    assert report.returncode == 0, report.stderr
    png, page = run / "report.png", run / "report.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "train/loss" in page.read_text()
    missing = run_module(["-m", "hylo.trainer.cli", "report", str(tmp_path / "nowhere")])
    assert missing.returncode == 2 and "metrics.jsonl does not exist" in missing.stderr
    for task in ("mqar", "passkey"):
        bad = run_module(["-m", "hylo.trainer.cli", "eval", "--checkpoint", str(tmp_path / "nowhere"), "--task", task])
        assert bad.returncode == 2 and "does not exist" in bad.stderr
    passkey = run_module(["-m", "hylo.trainer.cli", "eval", "--checkpoint", str(run / "checkpoints" / "step_8"),
                          "--task", "passkey", "--lengths", "64", "--depths", "0,0.5", "--trials", "1",
                          "--heatmap", str(tmp_path / "heat.png")])
    assert passkey.returncode == 0, passkey.stderr[-2000:]
    assert json.loads(passkey.stdout.strip().splitlines()[-1])["lengths"] == [64]
    assert (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"
