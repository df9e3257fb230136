import math

import pytest
import torch

from models import HybridLM
from models.attention import sliding_window_mask
from models.lm import layer_types
from models.rope import apply_rope
from trainer.config import ModelConfig


def naive_attention(q, k, v, window=None):
    """float64 oracle: (b, t, h, d) queries, (b, t, hk, d) keys/values, causal, optional window."""
    b, t, h, d = q.shape
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / math.sqrt(d)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v.double())


def small_cfg(**kw):
    base = dict(vocab_size=97, d_model=64, n_layers=4, n_heads=4, pattern=["swa", "full"], window=5)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("pattern", [["full"], ["swa"]])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_attention_mixer_matches_oracle(pattern, n_kv_heads):
    torch.manual_seed(0)
    cfg = small_cfg(pattern=pattern, n_kv_heads=n_kv_heads, n_layers=1)
    model = HybridLM(cfg).double()
    mixer = model.blocks[0].mixer
    x = torch.randn(2, 12, cfg.d_model, dtype=torch.float64, requires_grad=True)
    rope = model.rope(torch.arange(12))
    out = mixer(x, rope)
    hd = cfg.d_model // cfg.n_heads
    q, k, v = mixer.qkv(x).split([4 * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)
    q = apply_rope(q.view(2, 12, 4, hd), *rope)
    k = apply_rope(k.view(2, 12, n_kv_heads, hd), *rope)
    ref = mixer.out(naive_attention(q, k, v.view(2, 12, n_kv_heads, hd), 5 if pattern == ["swa"] else None).flatten(2))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    gx, = torch.autograd.grad(out, x, g)
    gx_ref, = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)


def test_window_mask_convention():
    mask = sliding_window_mask(6, 3, torch.device("cpu"))
    assert mask[5].tolist() == [False, False, False, True, True, True]  # itself and the 2 before
    assert mask[0].tolist() == [True, False, False, False, False, False]


def test_lm_is_causal_and_pattern_repeats():
    torch.manual_seed(0)
    cfg = small_cfg(n_layers=5)
    assert layer_types(cfg) == ["swa", "full", "swa", "full", "swa"]
    model = HybridLM(cfg).double()
    assert [b.layer_type for b in model.blocks] == layer_types(cfg)
    tokens = torch.randint(0, 97, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 97)
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])


def test_tied_and_untied_heads():
    tied, untied = HybridLM(small_cfg()), HybridLM(small_cfg(tie_embeddings=False))
    assert untied.num_params() - tied.num_params() == 97 * 64


def test_flops_per_token_counts_layer_types():
    seq, layers, d = 1024, 4, 64
    full = HybridLM(small_cfg(pattern=["full"], window=64))
    swa = HybridLM(small_cfg(pattern=["swa"], window=64))
    # tied head: the embedding matrix is counted once, as the output matmul; norm weights are not matmuls
    dense = 6 * sum(p.numel() for p in full.parameters() if p.dim() >= 2)
    # per layer, forward: QK^T and PV over the attended keys, 2 FLOPs per multiply-add, all heads (= d)
    assert full.flops_per_token(seq) == pytest.approx(dense + 3 * layers * 4 * d * (seq + 1) / 2)
    ctx = (64 * 65 / 2 + (seq - 64) * 64) / seq
    assert swa.flops_per_token(seq) == pytest.approx(dense + 3 * layers * 4 * d * ctx)
    assert swa.flops_per_token(4 * seq) - dense < (full.flops_per_token(4 * seq) - dense) / 10
