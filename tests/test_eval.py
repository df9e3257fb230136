"""Held-out perplexity (overall and by position), periodic evaluation, and the eval/generate subcommands."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hylo.models.lm import HybridLM
from hylo.trainer.config import ModelConfig
from hylo.trainer.evaluation.evaluate import perplexity
from tests.conftest import run_module


def test_bucket_perplexity_weights_back_to_the_overall():
    model = HybridLM(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, pattern=["swa", "rat"],
                                 window=8)).eval()
    batches = [torch.randint(0, 50, (3, 41)) for _ in range(2)]
    result = perplexity(model, batches, bucket=7)  # 40 positions: buckets of 7, the last one partial
    assert [b["lo"] for b in result["buckets"]] == [0, 7, 14, 21, 28, 35]
    assert sum(b["tokens"] for b in result["buckets"]) == result["tokens"] == 2 * 3 * 40
    weighted = sum(b["loss"] * b["tokens"] for b in result["buckets"]) / result["tokens"]
    assert weighted == pytest.approx(result["loss"], rel=1e-12)
    with torch.no_grad():
        direct = torch.stack([F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten(), reduction="none")
                              for b in batches]).mean().item()
    assert result["loss"] == pytest.approx(direct, rel=1e-6) and result["ppl"] == pytest.approx(math.exp(direct))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    res = run_module(["-m", "hylo.trainer.train", "--config", "configs/hybrid_tiny.yaml", f"run.dir={run}",
                      "train.steps=4", "checkpoint.interval=4", "logging.progress=false", "eval.interval=2",
                      "eval.batches=2", "eval.batch_size=2"])
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def test_periodic_eval_is_logged(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/ppl" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert len([k for k in evals[0] if k.startswith("eval/ppl_by_position/")]) == 8  # 128 tokens, buckets of 16


def test_hylo_eval_and_generate(trained, tmp_path):
    ckpt = trained / "checkpoints" / "step_4"
    res = run_module(["-m", "hylo.trainer.cli", "eval", "--checkpoint", str(ckpt), "--seq-len", "256", "--batches", "1",
                      "--batch-size", "2", "--bucket", "64"])
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert [b["lo"] for b in result["buckets"]] == [0, 64, 128, 192]  # beyond the trained 128: extrapolation
    outs = {}
    for flag in ([], ["--no-cache"]):
        gen = run_module(["-m", "hylo.trainer.cli", "generate", "--checkpoint", str(ckpt), "--prompt", "def main(",
                          "--max-new-tokens", "20", "--show-tokens", *flag])
        assert gen.returncode == 0, gen.stderr[-2000:]
        outs[bool(flag)] = [line for line in gen.stderr.splitlines() if line.startswith("TOKENS ")][0]
        assert "tokens/s" in gen.stderr
    assert outs[False] == outs[True]  # recurrent caches of every layer type == full forward per token
    # sampling: reproducible with a seed, and the same whether cached or not; top-k 1 is greedy
    sampled = {}
    for flag in ([], ["--no-cache"], ["--seed", "8"]):
        gen = run_module(["-m", "hylo.trainer.cli", "generate", "--checkpoint", str(ckpt), "--prompt", "def main(",
                          "--max-new-tokens", "20", "--show-tokens", "--temperature", "1.0", "--top-p", "0.9",
                          *(flag if flag[:1] == ["--seed"] else ["--seed", "7", *flag])])
        assert gen.returncode == 0, gen.stderr[-2000:]
        sampled[" ".join(flag)] = [x for x in gen.stderr.splitlines() if x.startswith("TOKENS ")][0]
    assert sampled[""] == sampled["--no-cache"] != sampled["--seed 8"]
    greedy_k1 = run_module(["-m", "hylo.trainer.cli", "generate", "--checkpoint", str(ckpt), "--prompt", "def main(",
                            "--max-new-tokens", "20", "--show-tokens", "--temperature", "0.7", "--top-k", "1"])
    assert [x for x in greedy_k1.stderr.splitlines() if x.startswith("TOKENS ")][0] == outs[False]
    # several prompts: one batch per prompt length, each decoded as it would be alone (greedy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main(\nimport os\ndef main(\n")
    many = run_module(["-m", "hylo.trainer.cli", "generate", "--checkpoint", str(ckpt), "--prompts", str(prompts),
                       "--max-new-tokens", "20", "--show-tokens"])
    assert many.returncode == 0, many.stderr[-2000:]
    rows = [x for x in many.stderr.splitlines() if x.startswith("TOKENS ")]
    assert len(rows) == 3 and rows[0] == rows[2] == outs[False] and "3 prompt(s) in 2 batch(es)" in many.stderr
    for cmd in (["eval"], ["generate", "--prompt", "x"]):
        missing = run_module(["-m", "hylo.trainer.cli", *cmd, "--checkpoint", str(tmp_path / "nope")])
        assert missing.returncode == 2 and "does not exist" in missing.stderr
