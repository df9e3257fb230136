"""`hylo export --format hf`: a folder transformers loads offline (AutoModelForCausalLM with trust_remote_code,
AutoTokenizer) whose model runs hylo's own layers: logits equal hylo's forward for every layer type, generate
(greedy, through the recurrent caches) equals hylo's decoding, `labels=` gives hylo's loss, and
padded batches (left for generation, right for scoring) give each row's unpadded result."""

from __future__ import annotations

import json

import pytest
import torch

from hylo.trainer.checkpointing.hf_model import HyloCache
from tests.conftest import run_module

transformers = pytest.importorskip("transformers")  # the dev extra installs it; CI runs these

TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=6", "model.pattern=[rat,tnl,swa,based,baseconv,full]",
        "model.window=8", "model.attn.sink=true", "model.rat.chunk_size=4", "train.seq_len=32", "train.batch_size=2",
        "logging.progress=false", "checkpoint.interval=3"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 3-step run with every layer type, exported in fp32: (hylo's model, the HF folder)."""
    from hylo.trainer.checkpointing.export import load_trained_model

    root = tmp_path_factory.mktemp("hf")
    res = run_module(["-m", "hylo.trainer.train", f"run.dir={root / 'run'}", "train.steps=3", *TINY])
    assert res.returncode == 0, res.stderr[-3000:]
    out = root / "hf"
    res = run_module(["-m", "hylo.trainer.cli", "export", "--checkpoint", str(root / "run"), "--format", "hf",
                      "--dtype", "fp32", "--out", str(out), "--max-shard-size", "100KB"])
    assert res.returncode == 0, res.stderr[-3000:]
    model, _ = load_trained_model(root / "run")
    return model.eval(), out


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def test_the_folder_holds_what_transformers_needs(exported):
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "configuration_hylo.py", "modeling_hylo.py", "model.safetensors.index.json"} <= names
    assert sum(name.startswith("model-0") for name in names) > 1  # sharded above --max-shard-size, with an index
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hylo" and "layer_types" not in config
    assert config["hylo_model"]["pattern"] == ["rat", "tnl", "swa", "based", "baseconv", "full"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hylo.HyloForCausalLM"
    for name in ("configuration_hylo.py", "modeling_hylo.py"):  # never a second copy of the layers
        assert "from hylo." in (out / name).read_text() and len((out / name).read_text().splitlines()) < 10


def test_an_export_of_the_safetensors_export_is_the_same_model(exported, tmp_path):
    model, out = exported
    run = out.parent / "run"
    file = tmp_path / "w.safetensors"
    assert run_module(["-m", "hylo.trainer.cli", "export", "--checkpoint", str(run), "--dtype", "fp32", "--out",
                       str(file)]).returncode == 0
    again = tmp_path / "hf"
    res = run_module(["-m", "hylo.trainer.cli", "export", "--checkpoint", str(file), "--format", "hf", "--dtype",
                      "fp32", "--out", str(again)])
    assert res.returncode == 0, res.stderr[-2000:]
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load(again)(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)


def test_logits_and_loss_equal_hylos_for_every_layer_type(exported):
    model, out = exported
    hf = load(out)
    assert type(hf).__name__ == "HyloForCausalLM"
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 21))
    with torch.no_grad():
        result = hf(tokens, labels=tokens)
        torch.testing.assert_close(result.logits, model(tokens), rtol=1e-5, atol=1e-5)
        targets = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)
        torch.testing.assert_close(result.loss, model(tokens, targets=targets), rtol=1e-5, atol=1e-6)


def test_greedy_generate_equals_hylos_decoding_through_the_caches(exported, monkeypatch):
    model, out = exported
    hf = load(out)
    hf.generation_config.eos_token_id = None  # hylo's decoding does not stop at EOS either
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 9))
    decoded = []
    step = hf._decode
    monkeypatch.setattr(hf, "_decode", lambda ids, cache: decoded.append(ids.shape) or step(ids, cache))
    with torch.no_grad():
        greedy = hf.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(greedy, model.generate(prompt, 12))
    assert len(decoded) == 11 and all(shape == (1, 1) for shape in decoded)  # the prompt prefilled once, then
    # one token at a time through the recurrent caches (never cut to its last token, never re-run)


@pytest.mark.parametrize("top_k", [0, 5])
def test_sampling_with_a_seed_equals_hylos_with_that_seed(exported, top_k):
    """`hylo generate --temperature T --top-k K --seed S` and `torch.manual_seed(S); generate(do_sample=True, ...)`
    draw the same tokens: the same softmax at T, the same top-k cut, one torch.multinomial draw per token."""
    from hylo.trainer.evaluation.generate import Sampler

    model, out = exported
    hf = load(out)
    hf.generation_config.eos_token_id = None
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 6))
    with torch.no_grad():
        ours = model.generate(prompt, 10, pick=Sampler(temperature=0.9, top_k=top_k, seed=5))
        torch.manual_seed(5)
        theirs = hf.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=top_k or None,
                             top_p=1.0)
    assert torch.equal(theirs, ours)


def test_padded_batches_give_each_rows_own_result(exported):
    model, out = exported
    hf = load(out)
    hf.generation_config.eos_token_id = None
    pad = 0
    rows = [torch.randint(1, model.cfg.vocab_size, (n,)) for n in (7, 11, 4)]
    width = max(len(r) for r in rows)
    left = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    left_mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    with torch.no_grad():
        batched = hf.generate(left, attention_mask=left_mask, max_new_tokens=6, do_sample=False, pad_token_id=pad)
        for i, row in enumerate(rows):
            alone = model.generate(row[None], 6)
            assert torch.equal(batched[i, width:], alone[0, len(row):]), i
        # scoring (lm-eval's log-likelihoods): right padding, no cache, each row's logits as alone
        right = torch.stack([torch.cat([r, torch.full((width - len(r),), pad)]) for r in rows])
        right_mask = left_mask.flip(1)
        scored = hf(right, attention_mask=right_mask, use_cache=False)
        assert scored.cache is None  # log-likelihood requests build no decoding state
        for i, row in enumerate(rows):
            torch.testing.assert_close(scored.logits[i, :len(row)], model(row[None])[0], rtol=1e-5, atol=1e-5)


def test_beam_search_through_the_cache_equals_it_without(exported):
    """Beam search reorders the cache every step (reorder_cache): the result equals beam search that re-runs
    the whole sequence each step (use_cache=False)."""
    model, out = exported
    hf = load(out)
    hf.generation_config.eos_token_id = None
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 7))
    with torch.no_grad():
        cached = hf.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=True)
        plain = hf.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_the_cache_is_a_transformers_cache_holding_hylos_states(exported):
    from transformers.cache_utils import Cache, CacheLayerMixin

    model, out = exported
    hf = load(out)
    with torch.no_grad():
        first = hf(torch.randint(0, model.cfg.vocab_size, (2, 5)), use_cache=True)
    cache = first.cache
    assert isinstance(cache, Cache) and isinstance(cache, HyloCache)
    assert all(isinstance(layer, CacheLayerMixin) for layer in cache.layers) and len(cache.layers) == 6
    assert cache.get_seq_length() == 5 and cache.layers[0].get_mask_sizes(1) == (6, 0)
    cache.reorder_cache(torch.tensor([1, 0]))  # beam search's reordering: rows swap
    with torch.no_grad():
        hf(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    assert cache.get_seq_length() == 6
    cache.layers[0].reset()
    assert cache.layers[0].get_seq_length() == 0


def test_tokenizer_loads_and_round_trips(exported):
    from transformers import AutoTokenizer

    from hylo.trainer.data.tokenizer import load_tokenizer

    _, out = exported
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    text = "def parse(x):\n    return x"
    assert tok(text)["input_ids"] == load_tokenizer().encode(text, add_special_tokens=False).ids
    assert tok.eos_token == "<|endoftext|>" and tok.decode(tok(text)["input_ids"]) == text


def test_lm_eval_scores_the_export_offline_as_hylos_own_log_likelihoods(exported, tmp_path):
    """lm-evaluation-harness on a local multiple-choice task (tests/fixtures/lm_eval): its accuracy equals the one
    computed from hylo's own log-likelihoods with the same context/continuation split lm-eval makes."""
    import shutil
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    model, out = exported
    fixtures = Path(__file__).parent / "fixtures" / "lm_eval"
    for name in ("tiny_choice.yaml", "tiny_choice.jsonl"):
        shutil.copy(fixtures / name, tmp_path / name)
    lm_eval = Path(sys.executable).parent / "lm_eval"
    res = run_module([str(lm_eval), "--model", "hf", "--model_args",
                      f"pretrained={out},trust_remote_code=True,dtype=float32", "--tasks", "hylo_tiny_choice",
                      "--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "2", "--output_path",
                      str(tmp_path / "results")], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]  # (run_module runs lm_eval's script with this python)
    (results,) = (tmp_path / "results").rglob("results_*.json")
    accuracy = json.loads(results.read_text())["results"]["hylo_tiny_choice"]["acc,none"]

    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    correct = 0
    rows = [json.loads(line) for line in (fixtures / "tiny_choice.jsonl").read_text().splitlines()]
    for row in rows:
        scores = []
        for choice in row["choices"]:
            context = tok(row["question"])["input_ids"]
            whole = tok(row["question"] + choice)["input_ids"]
            continuation = whole[len(context):]
            with torch.no_grad():
                logp = model(torch.tensor([whole]))[0].log_softmax(-1)
            scores.append(sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(continuation)))
        correct += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
    assert accuracy == pytest.approx(correct / len(rows))
