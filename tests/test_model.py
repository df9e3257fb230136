import sys

import pytest
import torch

from hylo.kernels.ops import attention
from hylo.models.attention import sink_statistics
from hylo.models.lm import HybridLM, layer_types
from hylo.models.rope import apply_rope
from hylo.trainer.config import ModelConfig
from tests.conftest import run_layer_monitor

F64 = torch.float64
ALL_TYPES = ["full", "swa", "rat", "based", "baseconv", "tnl"]


def small_cfg(**kw):
    base = dict(vocab_size=97, d_model=64, n_layers=4, n_heads=4, pattern=["swa", "full"], window=5)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.rat.chunk_size = 4
    return cfg


@pytest.mark.parametrize("pattern", [["full"], ["swa"]])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("gate", [False, True])
def test_attention_mixer_matches_oracle(pattern, n_kv_heads, gate):
    cfg = small_cfg(pattern=pattern, n_kv_heads=n_kv_heads, n_layers=1)
    cfg.attn.gate = gate
    model = HybridLM(cfg).double()
    mixer = model.blocks[0].mixer
    with torch.no_grad():
        mixer.sink.normal_()  # a trained sink, not the zero init
    x = torch.randn(2, 12, cfg.d_model, dtype=F64, requires_grad=True)
    positions = torch.arange(12)
    out = mixer(x, positions)
    hd = cfg.d_model // cfg.n_heads
    q, k, v = mixer.qkv(x).split([4 * hd, n_kv_heads * hd, n_kv_heads * hd], dim=-1)
    cos, sin = mixer.rope(positions)
    q, k = apply_rope(q.view(2, 12, 4, hd), cos, sin), apply_rope(k.view(2, 12, n_kv_heads, hd), cos, sin)
    o = attention(q, k, v.view(2, 12, n_kv_heads, hd), window=5 if pattern == ["swa"] else None, sink=mixer.sink,
                  backend="naive")
    if gate:
        o = o * torch.sigmoid(mixer.gate(x))[..., None]
    ref = mixer.out(o.flatten(2))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, mixer.sink], g)
    grads_ref = torch.autograd.grad(ref, [x, mixer.sink], g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_lm_is_causal_and_pattern_repeats():
    cfg = small_cfg(n_layers=8, pattern=ALL_TYPES)
    assert layer_types(cfg) == ALL_TYPES + ALL_TYPES[:2]
    model = HybridLM(cfg).double()
    assert [b.layer_type for b in model.blocks] == layer_types(cfg)
    tokens = torch.randint(0, 97, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 97)
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])


@pytest.mark.parametrize("layer", ALL_TYPES)
def test_step_decoding_equals_parallel_forward(layer):
    cfg = small_cfg(n_layers=2, pattern=[layer], tie_embeddings=False)
    cfg.attn.pinned, cfg.attn.gate, cfg.tnl.lrpe = 2, True, True
    model = HybridLM(cfg).double()
    tokens = torch.randint(0, 97, (2, 19))
    logits, caches, steps = model(tokens), None, []
    for pos in range(19):
        step_logits, caches = model.step(tokens[:, pos], pos, caches)
        steps.append(step_logits)
    torch.testing.assert_close(torch.stack(steps, 1), logits, rtol=0, atol=1e-10)


def test_rat_gate_bias_init_range():
    cfg = small_cfg(pattern=["rat"], n_layers=1)
    cfg.rat.chunk_size = 16
    gate = torch.sigmoid(HybridLM(cfg).blocks[0].mixer.gate_bias)
    assert gate.min() >= 0.5 - 1e-6 and gate.max() <= 15 / 16 + 1e-6 and gate.std() > 0.05


def test_tnl_layers_get_the_decay_schedule():
    cfg = small_cfg(pattern=["tnl"], n_layers=3)
    slopes = [b.mixer.slopes for b in HybridLM(cfg).blocks]
    assert slopes[0][0] == pytest.approx(0.25 * (1 + 1e-5)) and slopes[2].max() < 1e-4  # last layer barely decays
    assert (slopes[0] > slopes[1]).all() and (slopes[1] > slopes[2]).all()


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
    for linear in ("based", "tnl", "baseconv"):  # linear layers: the mixing cost per token does not grow with T
        model = HybridLM(small_cfg(pattern=[linear]))
        assert model.flops_per_token(4 * seq) == model.flops_per_token(seq)
    rat = HybridLM(small_cfg(pattern=["rat"]))
    grow = rat.flops_per_token(8 * seq) - rat.flops_per_token(seq)
    assert 0 < grow < (full.flops_per_token(8 * seq) - full.flops_per_token(seq)) / 3  # ~1/L of attention's


# ---------------------------------------------------------------------------------------------- sink monitor
def test_sink_monitor_sees_first_token_sink():
    """Every query puts (almost) all its attention on token 0: the monitor reports first-token mass ~1."""
    t, h, d = 64, 2, 8
    k = torch.zeros(1, t, h, d)
    k[:, 0, :, 0] = 20.0  # only token 0 has a key along the queries' direction
    q = torch.zeros(1, t, h, d)
    q[..., 0] = 20.0
    v = torch.randn(1, t, h, d)
    sink = torch.full((h,), -30.0)
    _, lse = attention(q, k, v, sink=sink, return_lse=True)
    stats = sink_statistics(q, k, lse, sink, window=None)
    assert stats["first_token_mass"].min() > 0.99
    assert stats["sink_mass"].max() < 1e-3 and (stats["secondary_count"] == 0).all()


def test_sink_monitor_finds_learned_and_secondary_sinks():
    t, h, d = 64, 1, 8
    q, k = torch.zeros(1, t, h, d), torch.zeros(1, t, h, d)
    q[..., 0] = 10.0
    k[:, 20, :, 0] = 2.0  # token 20 draws a share of every later query's attention: a secondary sink
    v = torch.randn(1, t, h, d)
    sink = torch.tensor([7.0])  # and the learned sink takes most of the rest
    _, lse = attention(q, k, v, sink=sink, return_lse=True)
    stats = sink_statistics(q, k, lse, sink, window=None, n_queries=32, threshold=0.3)
    assert stats["secondary_pos"][0, 0] == 20 and stats["secondary_count"][0] == 1
    assert stats["secondary_mass"][0, 0] > 0.3 and stats["sink_mass"][0] > 0.3


def test_sink_monitor_hooks_into_the_model_once():
    """The monitor callback's forward hooks report every attention layer once per due step, also when activation
    checkpointing re-runs the forward in backward, and are gone afterwards."""
    from hylo.parallel.activation_checkpointing import apply_activation_checkpointing

    model = HybridLM(small_cfg(pattern=["swa", "rat", "full"], n_layers=3))
    apply_activation_checkpointing(model)
    tokens = torch.randint(0, 97, (2, 16))
    calls = []
    for block in model.blocks:
        if block.layer_type != "rat":
            original = block.mixer.monitor
            block.mixer.monitor = lambda *a, f=original, **kw: calls.append(1) or f(*a, **kw)
    scalars = run_layer_monitor(model, "sinks", lambda: model(tokens).sum().backward(), n_queries=8, threshold=0.3)
    assert len(calls) == 2  # two attention layers, once each (not again in the recompute)
    layers = {tag.split("/")[1] for tag in scalars}
    assert layers == {"layer0", "layer2"} and len(scalars) == 2 * (4 * 4 + 1)
    for h in range(4):  # sink logit 0: a share of the mass, not all of it
        assert 0 < scalars[f"sinks/layer0/sink_mass/head{h}"] < 1
    assert all(not block.mixer._forward_hooks for block in model.blocks)


def test_activation_checkpointing_changes_nothing_but_memory():
    from hylo.parallel.activation_checkpointing import apply_activation_checkpointing

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=6, n_heads=2,
                      pattern=["full", "swa", "rat", "based", "baseconv", "tnl"], window=4)
    plain = HybridLM(cfg).double()
    recomputed = HybridLM(cfg).double()
    recomputed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(recomputed)
    assert recomputed.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay interchangeable
    tokens = torch.randint(0, 64, (2, 33))
    losses = []
    for model in (plain, recomputed):
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-14), name


@pytest.mark.parametrize("t", [1, 7, 16, 21])
def test_prefill_caches_equal_stepping_through_the_prompt(t):
    """One parallel pass over the prompt leaves every layer's cache where token-by-token decoding would."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=6, n_heads=2,
                      pattern=["full", "swa", "rat", "based", "baseconv", "tnl"], window=5)
    cfg.attn.pinned = 2
    cfg.rat.chunk_size = 4
    model = HybridLM(cfg).double().eval()
    tokens = torch.randint(0, 64, (2, t + 3))
    with torch.no_grad():
        caches = None
        for pos in range(t):
            stepped, caches = model.step(tokens[:, pos], pos, caches)
        prefilled, pre_caches = model.prefill(tokens[:, :t])
        torch.testing.assert_close(prefilled, stepped, rtol=1e-9, atol=1e-9)
        for pos in range(t, t + 3):  # decoding continues identically from either cache
            a, caches = model.step(tokens[:, pos], pos, caches)
            b, pre_caches = model.step(tokens[:, pos], pos, pre_caches)
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["full", "swa", "rat", "based", "baseconv", "tnl"])
def test_every_block_compiles_in_one_graph_on_the_chunk_path(kind):
    """torch.compile(fullgraph=True) of a block of every layer type: no graph break anywhere in the chunk paths
    (no tensor read back to the host), and the compiled block equals the eager one, forward and backward.
    (aot_eager: dynamo's graph capture and AOT autograd without inductor's code generation, to stay fast.)"""
    from hylo.models.lm import Block

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=6, n_heads=2, window=8)
    cfg.rat.chunk_size = 4
    cfg.attn.gate = True
    cfg.tnl.lrpe = True
    torch._dynamo.reset()
    block = Block(cfg, 1, kind)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 24, 32, requires_grad=True)
    pos = torch.arange(24)
    eager = block(x, pos)
    (grad_eager,) = torch.autograd.grad(eager.square().sum(), x)
    out = compiled(x, pos)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_eager, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("setting", [("attn", "flash"), ("attn", "chunk"), ("rat", "flash"), ("rat", "chunk"),
                                     ("based", "chunk"), ("tnl", "chunk")], ids="-".join)
def test_a_layers_backend_setting_reaches_its_op(setting, monkeypatch):
    """model.<type>.backend: the layer's op runs exactly the named kernels, in the forward and in prefill, and
    the model computes what it computes on auto (float64, where every backend is exact)."""
    kind, backend = setting
    op_name = {"attn": "attention", "rat": "rat_attention", "based": "based_linear_attention",
               "tnl": "lightning_attention"}[kind]
    cfg = small_cfg(pattern=["full", "swa", "rat", "based", "tnl"], n_layers=5)
    reference = HybridLM(cfg).double()
    getattr(cfg, kind).backend = backend
    model = HybridLM(cfg).double()
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 97, (2, 13))  # 13: not a multiple of RAT's chunk of 4

    import hylo.kernels.dispatch

    seen, choose = [], hylo.kernels.dispatch.choose_backend

    def spy(op, chosen, *args, **kw):
        seen.append((op, chosen))
        return choose(op, chosen, *args, **kw)

    for module in ("hylo.kernels.attention", "hylo.kernels.rat", "hylo.kernels.based", "hylo.kernels.lightning"):
        monkeypatch.setattr(sys.modules[module], "choose_backend", spy)  # (the package re-exports functions)
    for run in (model, model.prefill):
        seen.clear()
        run(tokens)
        ran = [b for op, b in seen if op == op_name]
        assert ran and set(ran) == {backend}, seen
    torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-9, atol=1e-9)
