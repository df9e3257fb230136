"""Long-context memory settings: checkpointing policies, tiled MLPs and activation offload change nothing but
memory; the planner's activation model matches what autograd really keeps; `hylo plan` flags what cannot fit."""

import weakref

import pytest
import torch

import hylo.kernels.dispatch
from hylo.models.lm import Block, HybridLM
from hylo.parallel.activation_checkpointing import apply_activation_checkpointing
from hylo.parallel.activation_offload import ActivationOffload, _State, is_weight
from hylo.trainer.cli import main as hylo_cli
from hylo.trainer.config import ConfigError, load_config
from hylo.trainer.memory_plan import RetainedBytes, block_saved, per_token, plan_memory, suggest
from hylo.trainer.trainer import run_problem

KINDS = ["full", "swa", "rat", "based", "baseconv", "tnl"]


def small(kind, *extra):
    return load_config(None, [f"model.pattern=[{kind}]", "model.n_layers=2", "model.d_model=64", "model.n_heads=2",
                              "model.vocab_size=64", "model.window=16", "model.rat.chunk_size=8", *extra]).model


def loss_and_grads(model_cfg, policy="none", offload=False):
    torch.manual_seed(0)
    model = HybridLM(model_cfg).double()
    apply_activation_checkpointing(model, policy)
    tokens, targets = torch.randint(0, 64, (2, 56)), torch.randint(0, 64, (2, 56))
    hooks = ActivationOffload(torch.device("cpu"), min_bytes=0)
    if offload:
        with hooks:
            loss = model(tokens, targets=targets)
    else:
        loss = model(tokens, targets=targets)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, hooks.offloaded_bytes


@pytest.mark.parametrize("kind", KINDS)
def test_policies_tiles_and_offload_give_the_plain_gradients(kind):
    plain_loss, plain_grads, _ = loss_and_grads(small(kind))
    variants = {"selective": (small(kind), "selective", False), "full": (small(kind), "full", False),
                "tiled MLP": (small(kind, "model.mlp_tile=24"), "none", False),  # 56 tokens: tiles 24, 24, 8
                "selective + tiled MLP": (small(kind, "model.mlp_tile=24"), "selective", False),
                "offload": (small(kind), "none", True), "full + offload": (small(kind), "full", True)}
    for name, (cfg, policy, offload) in variants.items():
        loss, grads, moved = loss_and_grads(cfg, policy, offload)
        torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=1e-12, msg=name)
        for key, grad in plain_grads.items():
            torch.testing.assert_close(grads[key], grad, rtol=1e-10, atol=1e-12, msg=f"{name}: {key}")
        if offload:  # at least every block's input went through the host copy
            assert moved >= 2 * 2 * 56 * 64 * 8, name


def test_offload_moves_checkpointed_inputs_through_the_host_copy(monkeypatch):
    """With full checkpointing what is saved outside the recomputed blocks is their inputs: offload copies them
    out and backward reads the copies (corrupting the copies changes the gradients)."""
    cfg = small("full")
    _, plain, _ = loss_and_grads(cfg, "full")
    original = _State.pack

    def corrupting_pack(self, t):
        packed = original(self, t)
        if not isinstance(packed, torch.Tensor) and packed.host.is_floating_point():
            packed.host.mul_(2.0)
        return packed

    monkeypatch.setattr(_State, "pack", corrupting_pack)
    _, corrupted, moved = loss_and_grads(cfg, "full", offload=True)
    assert moved > 0
    assert any(not torch.allclose(corrupted[k], plain[k]) for k in plain)


def test_offload_leaves_weights_alone_and_frees_its_copies_with_the_graph():
    linear = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16, requires_grad=True)
    hooks = ActivationOffload(torch.device("cpu"), min_bytes=0)
    offered, real_pack = [], hooks.state.pack

    def spy(t):
        packed = real_pack(t)
        offered.append((is_weight(t), isinstance(packed, torch.Tensor)))
        return packed

    hooks.state.pack = spy
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16):  # the cast copy of the weight is a weight too
        linear(x).float().square().sum().backward()
    assert any(weight for weight, _ in offered) and all(kept for weight, kept in offered if weight)
    assert any(not kept for _, kept in offered)  # the activations moved
    assert is_weight(linear.weight) and is_weight(linear.weight.t()) and not is_weight(x)

    plain = ActivationOffload(torch.device("cpu"), min_bytes=0)
    with plain:
        loss = linear(x).square().sum()
    state = weakref.ref(plain.state)
    loss.backward()
    del plain, loss
    assert state() is None  # no reference cycle: freed with the graph, before any garbage collection


def test_offload_is_refused_on_cpu_and_the_policy_names_are_checked():
    cfg = load_config(None, ["train.activation_offload=true"])
    assert "this run is on the CPU" in run_problem(cfg, 1, torch.device("cpu"))
    assert run_problem(cfg, 1, torch.device("cuda", 0)) is None
    assert load_config(None, ["train.activation_checkpointing=true"]).train.activation_checkpointing == "full"
    assert load_config(None, ["train.activation_checkpointing=false"]).train.activation_checkpointing == "none"
    with pytest.raises(ConfigError, match="train.activation_checkpointing='some'"):
        load_config(None, ["train.activation_checkpointing=some"])
    with pytest.raises(ConfigError, match="model.mlp_tile"):
        load_config(None, ["model.mlp_tile=-1"])
    with pytest.raises(ConfigError, match="selective does not compile"):
        load_config(None, ["train.activation_checkpointing=selective", "train.compile=true"])


@pytest.mark.parametrize("kind", ["full", "rat"])
def test_selective_checkpointing_recomputes_again_for_a_second_backward(kind):
    torch.manual_seed(0)
    model = HybridLM(small(kind)).double()
    apply_activation_checkpointing(model, "selective")
    tokens = torch.randint(0, 64, (2, 40))
    loss = model(tokens, targets=tokens)
    first = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_logits_at_gives_the_selected_rows_of_the_full_logits():
    torch.manual_seed(0)
    model = HybridLM(small("full")).double()
    tokens = torch.randint(0, 64, (2, 32))
    pick = torch.rand(2, 32) < 0.3
    torch.testing.assert_close(model(tokens, logits_at=pick), model(tokens)[pick])


# --------------------------------------------------------------------------------- the planner's activation model
def measured_block_bytes(kind, seq_len, policy, tile):
    """Bytes one block keeps after its forward with the fused (Triton) kernels, fp32, its input included."""
    cfg = small(kind, f"model.mlp_tile={tile}")
    block = Block(cfg, 0, kind)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([block])

    apply_activation_checkpointing(One(), policy)
    x = torch.randn(1, seq_len, cfg.d_model, requires_grad=True)
    with RetainedBytes() as probe:
        y = block(x, torch.arange(seq_len))
    return probe.retained(exclude=(*block.parameters(), x, y)) + x.numel() * 4, cfg


@pytest.mark.parametrize("kind", KINDS)
def test_activation_model_matches_what_autograd_keeps(kind, monkeypatch):
    """Every layer type, two lengths, each policy and the tiled MLP: within 15% of the bytes really kept (the fused
    kernels, on the CPU through the Triton interpreter, fp32)."""
    pytest.importorskip("triton")
    monkeypatch.setattr(hylo.kernels.dispatch, "triton_fits", lambda *tensors: True)
    cases = [(32, "none", 0), (64, "none", 0), (32, "selective", 0), (64, "selective", 0), (64, "full", 0),
             (64, "none", 16)]
    for seq_len, policy, tile in cases:
        measured, cfg = measured_block_bytes(kind, seq_len, policy, tile)
        predicted = seq_len * per_token(block_saved(kind, cfg, policy, tile, act=4, compute=4))
        assert predicted == pytest.approx(measured, rel=0.15), (seq_len, policy, tile, measured, predicted)


def test_plan_flags_a_config_that_cannot_fit_and_suggests_one_that_does(capsys):
    overrides = ["train.seq_len=131072", "train.batch_size=1", "train.micro_batch_size=1",
                 "train.activation_checkpointing=none"]
    cfg = load_config("configs/hybrid_1b.yaml", overrides)
    cfg.model.vocab_size = 32768
    plain = plan_memory(cfg, 1, 80)
    assert not plain.fits
    changes, fitted = suggest(cfg, 1, 80)
    assert fitted.fits and fitted.total < plain.total
    again = load_config("configs/hybrid_1b.yaml", overrides + changes)
    again.model.vocab_size = 32768
    assert plan_memory(again, 1, 80).fits

    assert hylo_cli(["plan", "--config", "configs/hybrid_1b.yaml", *overrides, "model.vocab_size=32768", "--gpu-mem",
                     "80"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "it fits with" in out
    assert hylo_cli(["plan", "--config", "configs/hybrid_1b.yaml", *overrides, "model.vocab_size=32768", *changes]) == 0
    assert ": fits" in capsys.readouterr().out


def test_plan_counts_sharding_and_context_parallel_buffers():
    cfg = load_config("configs/hybrid_1b.yaml", ["model.vocab_size=32768", "train.micro_batch_size=1"])
    lines = lambda plan: {name: b for name, b, _ in plan.lines}  # noqa: E731
    one = lines(plan_memory(cfg, 1, 80))
    cfg.parallel.dp_shard = True
    sharded = lines(plan_memory(cfg, 8, 80))
    assert sharded["AdamW moments (2 x fp32)"] == pytest.approx(one["AdamW moments (2 x fp32)"] / 8)
    cfg.parallel.dp_shard, cfg.parallel.cp = False, 4
    with_cp = lines(plan_memory(cfg, 4, 80))
    assert with_cp["activations"] == pytest.approx(one["activations"] / 4)
    assert with_cp["context-parallel buffers"] > 0


def test_plan_tries_one_sequence_per_micro_batch_first():
    """hybrid_1b at 128K with its 4-sequence micro-batches fits once the micro-batch is one sequence (the global
    batch kept by accumulation) — the planner suggests that before anything that costs compute."""
    cfg = load_config("configs/hybrid_1b.yaml", ["train.seq_len=131072", "model.vocab_size=32768"])
    assert not plan_memory(cfg, 1, 80).fits
    changes, fitted = suggest(cfg, 1, 80)
    assert changes[0] == "train.micro_batch_size=1" and fitted.fits


def test_gradients_at_the_peak_follow_the_timeline():
    """One GPU, one micro-batch: gradients are made block by block in backward while activations are freed, so
    the peak holds the larger of (activations + the first gradients) and (all gradients); accumulation and DDP
    (a bucket copy of every gradient) keep them all."""
    cfg = load_config("configs/hybrid_1b.yaml", ["model.vocab_size=32768", "train.batch_size=1",
                                                  "train.micro_batch_size=1", "train.seq_len=32768"])
    grads = lambda plan: dict((n, b) for n, b, _ in plan.lines)["gradients (fp32)"]  # noqa: E731
    weights = lambda plan: dict((n, b) for n, b, _ in plan.lines)["weights (fp32)"]  # noqa: E731
    single = plan_memory(cfg, 1, 141)
    assert grads(single) < 0.1 * weights(single)  # long context: activations dominate, few gradients at the peak
    short = load_config("configs/hybrid_1b.yaml", ["model.vocab_size=32768", "train.batch_size=1",
                                                   "train.micro_batch_size=1", "train.seq_len=128"])
    dynamic = lambda plan: sum(b for n, b, _ in plan.lines if n not in ("weights (fp32)", "gradients (fp32)",  # noqa: E731
                                                                        "AdamW moments (2 x fp32)", "runtime"))
    tiny = plan_memory(short, 1, 141)  # short context: the optimizer step's full gradients are the peak
    assert grads(tiny) + dynamic(tiny) == pytest.approx(4 * _params(short))
    accumulating = load_config("configs/hybrid_1b.yaml", ["model.vocab_size=32768", "train.batch_size=2",
                                                          "train.micro_batch_size=1", "train.seq_len=32768"])
    assert grads(plan_memory(accumulating, 1, 141)) == pytest.approx(weights(single))
    ddp = load_config("configs/hybrid_1b.yaml", ["model.vocab_size=32768", "train.batch_size=2",
                                                 "train.micro_batch_size=1", "train.seq_len=32768"])
    assert grads(plan_memory(ddp, 2, 141)) == pytest.approx(weights(single))


def _params(cfg) -> int:
    from hylo.trainer.memory_plan import _parameter_counts

    return _parameter_counts(cfg)[0]



@pytest.mark.parametrize("seq_len, memory, policy", [(4096, 80, "none"), (32768, 80, "selective"),
                                                     (131072, 80, "full"), (131072, 141, "selective")])
def test_checkpointing_auto_takes_the_cheapest_policy_that_fits(seq_len, memory, policy):
    """train.activation_checkpointing=auto (the default): none where it fits, else selective, else full — by the
    plan of the device the run starts on; `hylo plan` shows the policy it took."""
    from hylo.trainer.memory_plan import choose_checkpointing

    cfg = load_config("configs/hybrid_1b.yaml", ["model.vocab_size=32768", "train.batch_size=1",
                                                 "train.micro_batch_size=1", f"train.seq_len={seq_len}"])
    assert cfg.train.activation_checkpointing == "auto"
    chosen, why = choose_checkpointing(cfg, 1, memory)
    assert chosen == policy and f"auto: {policy}" in why
    plan = plan_memory(cfg, 1, memory)
    assert f"{policy} checkpointing" in dict((n, h) for n, _, h in plan.lines)["activations"]
    cfg.train.compile = "on"  # selective does not compile: auto goes straight to full
    assert choose_checkpointing(cfg, 1, memory)[0] == ("full" if policy == "selective" else policy)
