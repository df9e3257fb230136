"""The layer-zoo presets: the large ones build at their advertised size, the tiny CPU variants train and decode."""

import json

import pytest
import torch

from hylo.models.lm import HybridLM
from hylo.trainer.checkpointing import load_weights
from hylo.trainer.config import load_config
from hylo.trainer.train import train

LARGE = {  # preset: (min, max) parameters with a 32K vocabulary
    "rat_swa_1b": (1.1e9, 1.5e9),
    "based_360m": (0.3e9, 0.4e9),
    "based_1b": (1.1e9, 1.45e9),
    "tnl_1b": (0.9e9, 1.2e9),
    "hybrid_1b": (1.1e9, 1.5e9),
}
TINY = ["rat_swa_tiny", "based_tiny", "tnl_tiny", "hybrid_tiny"]


@pytest.mark.parametrize("name", LARGE)
def test_large_preset_builds_at_its_size(name):
    cfg = load_config(f"configs/{name}.yaml", ["model.vocab_size=32000"])
    with torch.device("meta"):
        n = HybridLM(cfg.model).num_params()
    low, high = LARGE[name]
    assert low <= n <= high, f"{name}: {n / 1e9:.2f}B parameters"


# hybrid_tiny (every layer type) runs by default; the single-type presets with -m slow (each op's decoding is
# checked against its parallel forward in the kernel tests)
@pytest.mark.parametrize("name", [n if n == "hybrid_tiny" else pytest.param(n, marks=pytest.mark.slow) for n in TINY])
def test_tiny_preset_trains_and_decodes(name, tmp_path):
    cfg = load_config(f"configs/{name}.yaml", [f"run.dir={tmp_path}", "train.steps=50", "logging.interval=10",
                                               "checkpoint.interval=50", "logging.progress=false"])
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = [r["train/loss"] for r in rows if "train/loss" in r][0]
    assert summary["last_loss"] < first - 1.0, (first, summary["last_loss"])

    # Greedy generation through the recurrent caches == re-running the full forward on the growing sequence, with
    # the weights just trained (trained gates, decays and sinks, not the initialisation).
    model = HybridLM(cfg.model)
    load_weights(tmp_path / "checkpoints" / "step_50", model)
    model = model.double().eval()
    prompt = torch.randint(0, cfg.model.vocab_size, (2, 7))
    generated = model.generate(prompt, max_new_tokens=25)
    tokens = prompt
    with torch.no_grad():
        for _ in range(25):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)
