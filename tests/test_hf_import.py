"""Hugging Face in: `hylo import --hf DIR` and `model.init_from=DIR` start hylo from a local Llama-family folder (tiny
random models made here with transformers), or from hylo's own `export --format hf`.  With `model.pattern=[full]`
and no sinks the logits equal the HF model's (the proof that the mapping is right); hybrids keep the attention
layers' weights and start the other mixers from them where shapes allow; refusals are one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from hylo.models.lm import HybridLM
from hylo.trainer.checkpointing.hf_import import apply_shape, convert, read_hf_config, read_hf_tensors
from hylo.trainer.config import load_config
from tests.conftest import run_module

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random LlamaForCausalLM (GQA, untied head) with hylo's bundled tokenizer, saved as HF saves it."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from hylo.trainer.data.tokenizer import EOS, load_tokenizer

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=50000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=load_tokenizer(), eos_token=EOS).save_pretrained(folder)
    return model, folder


def hylo_from(folder, *overrides: str) -> tuple[HybridLM, dict]:
    cfg = load_config(None, list(overrides))
    apply_shape(cfg.model, read_hf_config(folder), {o.split("=")[0] for o in overrides})
    model = HybridLM(cfg.model).eval()
    return model, convert(read_hf_tensors(folder), model)


def test_full_attention_import_equals_the_hf_models_logits(llama):
    hf, folder = llama
    model, report = hylo_from(folder, "model.pattern=[full]", "model.attn.sink=false")
    assert report["fresh"] == []  # every tensor from the checkpoint
    tokens = torch.randint(0, 4096, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
    assert (model.cfg.d_model, model.cfg.n_kv_heads, model.cfg.ffn_dim, model.cfg.rope_theta) == (64, 2, 160, 5e4)


def test_a_hybrid_keeps_attention_and_starts_the_other_mixers_from_it(llama):
    hf, folder = llama
    model, report = hylo_from(folder, "model.pattern=[full,tnl,rat]", "model.attn.sink=true")
    state = model.state_dict()
    q = hf.state_dict()["model.layers.1.self_attn.q_proj.weight"]
    torch.testing.assert_close(state["blocks.1.mixer.qkvu.weight"][:64], q)  # TNL's q from the attention it replaces
    k = hf.state_dict()["model.layers.1.self_attn.k_proj.weight"]  # 2 KV heads, repeated for TNL's 4 heads
    torch.testing.assert_close(state["blocks.1.mixer.qkvu.weight"][64:128], k.view(2, 16, 64).repeat_interleave(
        2, 0).reshape(64, 64))
    assert "blocks.1.mixer.out.weight" in report["copied"] and "blocks.0.mixer.sink" in report["derived"]
    assert "blocks.2.mixer.gate_bias" in report["fresh"]
    assert (state["blocks.0.mixer.sink"] == -20).all()  # the softmax as it was, to ~1e-9 a token
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 4096, (1, 20)))).all()


def test_hylo_import_writes_what_init_from_takes_and_training_starts_from_it(llama, tmp_path):
    hf, folder = llama
    out = tmp_path / "llama.safetensors"
    res = run_module(["-m", "hylo.trainer.cli", "import", "--hf", str(folder), "--out", str(out),
                      "model.pattern=[full]", "model.attn.sink=false"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "tensors copied" in res.stdout and f"data.tokenizer={folder / 'tokenizer.json'}" in res.stdout
    assert json.loads(out.with_suffix(".json").read_text())["d_model"] == 64
    train = ["train.steps=1", "train.seq_len=32", "train.batch_size=2", "logging.progress=false",
             "model.pattern=[full]", "model.attn.sink=false", f"data.tokenizer={folder / 'tokenizer.json'}"]
    from_file = run_module(["-m", "hylo.trainer.train", f"run.dir={tmp_path / 'a'}", f"model.init_from={out}",
                            *train, *(f"model.{k}={v}" for k, v in (("vocab_size", 4096), ("d_model", 64),
                                                                      ("n_layers", 3), ("n_heads", 4),
                                                                      ("n_kv_heads", 2), ("ffn_dim", 160),
                                                                      ("rope_theta", 50000.0),
                                                                      ("norm_eps", 1e-5),
                                                                      ("tie_embeddings", "false")))])
    assert from_file.returncode == 0, from_file.stderr[-2000:]
    in_memory = run_module(["-m", "hylo.trainer.train", f"run.dir={tmp_path / 'b'}", f"model.init_from={folder}",
                            *train])
    assert in_memory.returncode == 0, in_memory.stderr[-2000:]
    assert "tensors copied" in in_memory.stdout
    first = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])["train/loss"]
             for run in ("a", "b")]
    assert first[0] == pytest.approx(first[1], rel=1e-6)  # the same weights, from the file or the folder


def test_a_hylo_hf_export_comes_back_through_init_from_with_the_same_first_loss(tmp_path):
    small = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "train.seq_len=32", "train.batch_size=2",
             "logging.progress=false", "model.pattern=[tnl,full]"]
    assert run_module(["-m", "hylo.trainer.train", f"run.dir={tmp_path / 'run'}", "train.steps=20",
                       *small]).returncode == 0
    for fmt, out in (("hf", tmp_path / "hf"), ("safetensors", tmp_path / "w.safetensors")):
        res = run_module(["-m", "hylo.trainer.cli", "export", "--checkpoint", str(tmp_path / "run"), "--format", fmt,
                          "--dtype", "fp32", "--out", str(out)])
        assert res.returncode == 0, res.stderr[-2000:]
    losses = []
    for name, source in (("from_hf", tmp_path / "hf"), ("from_file", tmp_path / "w.safetensors")):
        res = run_module(["-m", "hylo.trainer.train", f"run.dir={tmp_path / name}", f"model.init_from={source}",
                          "train.steps=1", *small])
        assert res.returncode == 0, res.stderr[-2000:]
        losses.append(json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["train/loss"])
    assert losses[0] == losses[1]


def test_a_mistral_sliding_window_maps_to_swa(tmp_path):
    """Mistral's sliding window: its layers are hylo's swa with that window (logits equal, past the window);
    asked for full attention, the import is refused naming the window."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                           max_position_embeddings=256, tie_word_embeddings=True)
    hf = MistralForCausalLM(config).eval()
    hf.config._attn_implementation = "eager"  # (the window is applied by every implementation; eager is exact)
    hf.save_pretrained(tmp_path)
    model, report = hylo_from(tmp_path, "model.pattern=[swa]", "model.window=8", "model.attn.sink=false")
    tokens = torch.randint(0, 512, (1, 30))  # past the window
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
    assert model.head is None  # tied, as the HF model is
    with pytest.raises(Exception, match="sliding window of 8 tokens"):
        hylo_from(tmp_path, "model.pattern=[full]")


@pytest.mark.parametrize("damage", ["architecture", "shape", "missing tensor", "no config"])
def test_refusals_are_one_line(llama, tmp_path, damage):
    import shutil

    _, folder = llama
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    extra = []
    if damage == "architecture":
        config = json.loads((copy / "config.json").read_text())
        config["architectures"] = ["GPT2LMHeadModel"]
        (copy / "config.json").write_text(json.dumps(config))
        needle = "holds a GPT2LMHeadModel"
    elif damage == "shape":
        extra, needle = ["model.d_model=128"], "model.d_model=128 disagrees"
    elif damage == "missing tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(copy / "model.safetensors"))
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
        needle = "no tensor 'layers.1.mlp.up_proj.weight'"
    else:
        (copy / "config.json").unlink()
        needle = "has no config.json"
    res = run_module(["-m", "hylo.trainer.cli", "import", "--hf", str(copy), "--out", str(tmp_path / "w.safetensors"),
                      "model.pattern=[full]", *extra])
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1


def test_a_llama_style_end_of_document_token_is_found(tmp_path):
    from hylo.trainer.data.tokenizer import BUNDLED_TOKENIZER, EOS, eos_id, load_tokenizer

    renamed = tmp_path / "tokenizer.json"
    renamed.write_text(BUNDLED_TOKENIZER.read_text().replace(EOS, "</s>"))
    tok = load_tokenizer(renamed)
    assert tok.token_to_id(EOS) is None and eos_id(tok) == tok.token_to_id("</s>") == 0
