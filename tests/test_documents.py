"""Document masking: packed documents (cu_seqlens) give exactly what each document gives alone, in every op and
backend, in the model, and in training."""

import json
import math

import pytest
import torch

from hylo.kernels.ops import attention, based_linear_attention, lightning_attention, rat_attention, short_conv
from hylo.kernels.varlen import document_bounds, positions_within_documents
from hylo.models.lm import HybridLM
from hylo.trainer.config import ConfigError, load_config
from hylo.trainer.data.documents import pack_documents
from hylo.trainer.train import train

F64 = torch.float64


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


# Lengths: a 1-token document, lengths off the block/chunk grid (8 and 16 below), a document longer than the
# window, many tiny ones, boundaries exactly on a chunk edge (16, 32) and one token off (33).
LAYOUTS = {"mixed": [1, 15, 16, 9, 40, 3], "edges": [16, 16, 1, 32, 8], "tiny": [2, 1, 3, 1, 1, 2, 5, 1, 4, 1],
           "one": [37]}


def per_document(fn, lengths, *tensors):
    """The oracle's way: run each document alone and concatenate along the sequence."""
    outs, start = [], 0
    for n in lengths:
        outs.append(fn(*(t[:, start:start + n] for t in tensors)))
        start += n
    return outs


def grads_of(out_fn, inputs):
    for t in inputs:
        t.grad = None
    out = out_fn()
    outs = out if isinstance(out, tuple) else (out,)
    # (randn, not randn_like: randn_like follows the output's strides, which differ between paths)
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(i))).sum()
               for i, o in enumerate(outs))
    loss.backward()
    # (an input a path never reads, as RAT's queries in a one-chunk document, gets no gradient: zero)
    return [o.detach() for o in outs], [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in inputs]


def leaf(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["naive", "chunk", "flash"])
@pytest.mark.parametrize("kind", ["full", "window", "window+pinned", "gqa"])
def test_attention_packed_equals_each_document(kind, backend, layout):
    lengths = LAYOUTS[layout]
    t, h = sum(lengths), 4
    kv = 2 if kind == "gqa" else h
    q, k, v = leaf(1, t, h, 8), leaf(1, t, kv, 8), leaf(1, t, kv, 8)
    sink = leaf(h)
    kw = {"window": 12 if "window" in kind else None, "n_pinned": 2 if "pinned" in kind else 0, "sink": sink,
          "return_lse": True}
    inputs = [q, k, v, sink]
    packed, d_packed = grads_of(lambda: attention(q, k, v, backend=backend, cu_seqlens=cu(lengths), **kw), inputs)

    def reference():
        parts = per_document(lambda a, b, c: attention(a, b, c, backend="naive", **kw), lengths, q, k, v)
        return torch.cat([o for o, _ in parts], 1), torch.cat([lse for _, lse in parts], 2)

    expected, d_expected = grads_of(reference, inputs)
    for got, want in zip(packed + d_packed, expected + d_expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["naive", "chunk"])
def test_linear_ops_restart_their_state_at_every_document(backend, layout):
    lengths = LAYOUTS[layout]
    t, h = sum(lengths), 2
    torch.manual_seed(0)
    # lightning: an initial state for the first document only, the last document's final state
    q, k, v = leaf(1, t, h, 4), leaf(1, t, h, 4), leaf(1, t, h, 6)
    decay, s0 = torch.tensor([0.1, 0.5], dtype=F64), leaf(1, h, 4, 6)
    packed, d_packed = grads_of(lambda: lightning_attention(q, k, v, decay, initial_state=s0, output_final_state=True,
                                                            backend=backend, cu_seqlens=cu(lengths)), [q, k, v, s0])

    def lightning_reference():
        outs, state, start = [], s0, 0
        for n in lengths:
            o, last = lightning_attention(q[:, start:start + n], k[:, start:start + n], v[:, start:start + n], decay,
                                          initial_state=state if start == 0 else None, output_final_state=True,
                                          backend="naive")
            outs.append(o)
            start += n
        return torch.cat(outs, 1), last

    expected, d_expected = grads_of(lightning_reference, [q, k, v, s0])
    for got, want in zip(packed + d_packed, expected + d_expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)

    # BASED
    q, k, v = leaf(1, t, h, 3), leaf(1, t, h, 3), leaf(1, t, h, 5)
    packed, d_packed = grads_of(lambda: based_linear_attention(q, k, v, output_final_state=True, backend=backend,
                                                               cu_seqlens=cu(lengths))[0], [q, k, v])
    expected, d_expected = grads_of(lambda: torch.cat(per_document(
        lambda a, b, c: based_linear_attention(a, b, c, backend="naive"), lengths, q, k, v), 1), [q, k, v])
    for got, want in zip(packed + d_packed, expected + d_expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    _, (state, z) = based_linear_attention(q, k, v, output_final_state=True, backend=backend, cu_seqlens=cu(lengths))
    _, (last_state, last_z) = based_linear_attention(q[:, -lengths[-1]:], k[:, -lengths[-1]:], v[:, -lengths[-1]:],
                                                     output_final_state=True, backend=backend)
    torch.testing.assert_close(state, last_state)
    torch.testing.assert_close(z, last_z)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["naive", "chunk", "flash"])
@pytest.mark.parametrize("rope", [None, 10000.0])
def test_rat_chunk_grid_restarts_at_every_document(backend, layout, rope):
    lengths = LAYOUTS[layout]
    t, h = sum(lengths), 2
    q, k, v = leaf(1, t, h, 4), leaf(1, t, h, 4), leaf(1, t, h, 4)
    gate = torch.sigmoid(torch.randn(1, t, h, 4, dtype=F64)).requires_grad_()
    inputs = [q, k, v, gate]
    packed, d_packed = grads_of(lambda: rat_attention(q, k, v, gate, 8, rope_theta=rope, backend=backend,
                                                      cu_seqlens=cu(lengths)), inputs)
    expected, d_expected = grads_of(lambda: torch.cat(per_document(
        lambda a, b, c, g: rat_attention(a, b, c, g, 8, rope_theta=rope, backend="naive"), lengths, q, k, v, gate),
        1), inputs)
    for got, want in zip(packed + d_packed, expected + d_expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", ["naive", "chunk"])
def test_short_conv_sees_zeros_before_each_document(backend):
    lengths = LAYOUTS["mixed"]
    x, w, b = leaf(1, sum(lengths), 6), leaf(6, 3), leaf(6)
    packed, d_packed = grads_of(lambda: short_conv(x, w, b, backend=backend, cu_seqlens=cu(lengths)), [x, w, b])
    expected, d_expected = grads_of(lambda: torch.cat(per_document(
        lambda a: short_conv(a, w, b, backend="naive"), lengths, x), 1), [x, w, b])
    for got, want in zip(packed + d_packed, expected + d_expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_triton_backends_take_cu_seqlens():
    """The Triton kernels (under the interpreter here) run each document: fp32 against the fp64 oracle."""
    pytest.importorskip("triton")
    lengths = [5, 16, 1, 20]
    t = sum(lengths)
    q, k, v = (torch.randn(1, t, 2, 16) for _ in range(3))
    sink = torch.zeros(2)
    got = attention(q, k, v, sink=sink, window=8, backend="triton", cu_seqlens=cu(lengths))
    want = torch.cat(per_document(lambda a, b, c: attention(a, b, c, sink=sink, window=8, backend="naive"),
                                  lengths, q.double(), k.double(), v.double()), 1)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)
    decay = torch.tensor([0.2, 0.6])
    got = lightning_attention(q, k, v, decay, backend="triton", cu_seqlens=cu(lengths))
    want = torch.cat(per_document(lambda a, b, c: lightning_attention(a, b, c, decay.double(), backend="naive"),
                                  lengths, q.double(), k.double(), v.double()), 1)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("op", ["lightning", "based"])
def test_triton_linear_kernels_run_packed_documents_in_one_launch_chain(op, monkeypatch):
    """Lightning's and BASED's Triton kernels take the documents themselves (chunks restart at every document):
    outputs, final state and every gradient (initial state included) equal each document alone, fp32 against the
    fp64 oracle; lengths of 1, one token under / exactly / over a chunk (16 under the interpreter), several
    chunks; one call for all documents."""
    pytest.importorskip("triton")
    import importlib

    module = importlib.import_module(f"hylo.kernels.{op}.triton")
    name = f"_{op}_forward"
    calls, forward = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(a[-1]) or forward(*a))
    lengths = [5, 16, 1, 17, 33, 15]
    t = sum(lengths)
    g = torch.Generator().manual_seed(7)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    d = 16 if op == "lightning" else 4
    q, k, v = randn(1, t, 2, d, scale=0.5), randn(1, t, 2, d, scale=0.5), randn(1, t, 2, 8)
    if op == "lightning":
        decay = torch.tensor([0.2, 0.6])
        state = [randn(1, 2, d, 8)]

        def call(xs, backend, dtype):
            return lightning_attention(*xs[:3], decay.to(dtype), initial_state=xs[3], output_final_state=True,
                                       backend=backend, cu_seqlens=cu(lengths))
    else:
        f = 1 + d + d * d
        state = [randn(1, 2, f, 8), randn(1, 2, f).abs()]

        def call(xs, backend, dtype):
            return based_linear_attention(*xs[:3], initial_state=(xs[3], xs[4]), output_final_state=True,
                                          backend=backend, cu_seqlens=cu(lengths))
    inputs = [q, k, v, *state]

    def run(backend, dtype):
        xs = [x.to(dtype).requires_grad_() for x in inputs]
        out, final = call(xs, backend, dtype)
        finals = list(final) if isinstance(final, tuple) else [final]
        wg = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=wg, dtype=torch.float64).to(dtype)).sum()
        for x in finals:
            loss = loss + (x * torch.randn(x.shape, generator=wg, dtype=torch.float64).to(x.dtype)).sum()
        loss.backward()
        return [out.detach().double(), *(x.detach().double() for x in finals), *(x.grad.double() for x in xs)]

    got, want = run("triton", torch.float32), run("naive", torch.float64)
    assert len(calls) == 1 and calls[0] is not None, "one call with the documents, not one per document"
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"result {i}: {m}")


@pytest.mark.parametrize("bounds, batch, message", [
    ([1, 5, 10], 1, "must start at 0"),
    ([0, 5, 9], 1, "must end at the sequence length 10"),
    ([0, 5, 5, 10], 1, "zero-length documents are not allowed"),
    ([0, 6, 4, 10], 1, "must increase strictly"),
    ([0, 5, 10], 2, "batch size 1"),
])
def test_bad_cu_seqlens_are_named(bounds, batch, message):
    q = torch.randn(batch, 10, 2, 4)
    with pytest.raises(ValueError, match=message):
        attention(q, q, q, cu_seqlens=torch.tensor(bounds))
    with pytest.raises(ValueError, match="int32 or int64"):
        document_bounds(torch.tensor([0.0, 10.0]), q[:1], "attention")
    with pytest.raises(ValueError, match="1-D"):
        document_bounds(torch.tensor([[0, 10]]), q[:1], "attention")


# ------------------------------------------------------------------------------------------------ model level
def test_packing_finds_documents_at_eos_and_row_boundaries():
    eos = 7
    inputs = torch.tensor([[1, 2, 7, 3, 4, 7], [5, 7, 6, 6, 6, 6]])
    packed = pack_documents(inputs, inputs, eos, restart_positions=False)
    assert packed.cu_seqlens.tolist() == [0, 3, 6, 8, 12]
    assert packed.positions.tolist() == [0, 1, 2, 3, 4, 5] * 2
    restarted = pack_documents(inputs, inputs, eos, restart_positions=True)
    assert restarted.positions.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert positions_within_documents(cu([3, 1, 2]), 6).tolist() == [0, 1, 2, 0, 0, 1]
    # a context-parallel rank (zigzag: positions 0, 1 and 4, 5 of each row) keeps its tokens of every row, with
    # the whole sequence's boundaries
    local = torch.tensor([0, 1, 4, 5])
    mine = pack_documents(inputs, inputs, eos, restart_positions=True, local=local)
    assert mine.cu_seqlens.tolist() == [0, 3, 6, 8, 12]
    assert mine.inputs.tolist() == [[1, 2, 4, 7, 5, 7, 6, 6]]
    assert mine.positions.tolist() == [0, 1, 1, 2, 0, 1, 2, 3]


def test_sink_statistics_of_packed_documents_are_each_documents_own():
    # The sink monitor on a packed sequence sees each document as a sequence of its own: the secondary sinks of
    # the longest document equal its statistics alone, and the sink / first-token masses are the documents'
    # query-weighted means.
    from hylo.kernels.varlen import document_view
    from hylo.models.attention import sink_statistics

    g = torch.Generator().manual_seed(3)
    lengths = [5, 1, 13, 9]
    t, h, d = sum(lengths), 2, 8
    q, k = torch.randn(1, t, h, d, generator=g, dtype=torch.float64), torch.randn(1, t, h, d, generator=g,
                                                                                 dtype=torch.float64)
    v, sink = torch.randn(1, t, h, d, generator=g, dtype=torch.float64), torch.randn(h, generator=g,
                                                                                    dtype=torch.float64)
    bounds = cu(lengths)
    for window in (None, 4):
        _, lse = attention(q, k, v, window=window, sink=sink, cu_seqlens=bounds, return_lse=True, backend="naive")
        view = document_view(bounds, torch.arange(t))
        packed = sink_statistics(q, k, lse, sink, window=window, n_queries=6, documents=view)
        alone = []
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            _, lse_d = attention(q[:, a:b], k[:, a:b], v[:, a:b], window=window, sink=sink, return_lse=True,
                                 backend="naive")
            alone.append(sink_statistics(q[:, a:b], k[:, a:b], lse_d, sink, window=window, n_queries=6))
        longest = alone[lengths.index(max(lengths))]
        for key in ("secondary_pos", "secondary_mass", "secondary_count"):
            torch.testing.assert_close(packed[key], longest[key], rtol=1e-6, atol=1e-7)
        def weighted(key, weights, alone=alone):
            return sum(w * s[key] for w, s in zip(weights, alone, strict=True)) / sum(weights)

        torch.testing.assert_close(packed["sink_mass"], weighted("sink_mass", lengths))
        seeing = [min(n, window or n) for n in lengths]  # queries that see their document's first token
        torch.testing.assert_close(packed["first_token_mass"], weighted("first_token_mass", seeing))


@pytest.mark.parametrize("pattern", [["full"], ["swa"], ["rat"], ["based"], ["baseconv"], ["tnl"],
                                     ["rat", "tnl", "swa", "based", "baseconv", "full"]])
@pytest.mark.parametrize("restart", [False, True])
def test_model_loss_of_a_packed_batch_equals_each_document_alone(pattern, restart):
    cfg = load_config(None, [f"model.pattern=[{','.join(pattern)}]", f"model.n_layers={max(2, len(pattern))}",
                             "model.d_model=32", "model.n_heads=2", "model.vocab_size=50", "model.window=6",
                             "model.rat.chunk_size=4", "model.tnl.lrpe=true"]).model
    torch.manual_seed(0)
    model = HybridLM(cfg).double()
    eos = 3
    inputs = torch.randint(4, 50, (2, 24))
    inputs[0, [4, 5, 13]] = eos  # a 1-token document, boundaries inside chunks and on a chunk edge
    inputs[1, 9] = eos
    targets = torch.randint(0, 50, (2, 24))
    packed = pack_documents(inputs, targets, eos, restart)
    nll = model(packed.inputs, packed.positions, targets=packed.targets, reduction="none",
                cu_seqlens=packed.cu_seqlens)[0]
    for a, b in zip(packed.cu_seqlens[:-1].tolist(), packed.cu_seqlens[1:].tolist(), strict=True):
        row, start = divmod(a, 24)
        positions = torch.arange(b - a) if restart else torch.arange(start, start + b - a)
        alone = model(inputs[row:row + 1, start:start + b - a], positions,
                      targets=targets[row:row + 1, start:start + b - a], reduction="none")[0]
        torch.testing.assert_close(nll[a:b], alone, rtol=1e-9, atol=1e-10)
    unmasked = model(inputs, targets=targets, reduction="none").flatten()
    assert not torch.allclose(unmasked, nll), "masking must change what tokens after a boundary see"


def test_config_refusals():
    with pytest.raises(ConfigError, match="MQAR sequences are one document each"):
        load_config(None, ["data.format=mqar", "data.document_masking=true", "eval.tasks=[mqar]"])
    with pytest.raises(ConfigError, match="only data.document_masking=true marks"):
        load_config(None, ["model.document_positions=true"])
    load_config(None, ["data.document_masking=true", "parallel.cp=2"])  # context parallelism takes documents


def test_training_with_document_masking_learns(tmp_path):
    # (each layer type's masking is checked exactly above; here the default model trains through the packing,
    # with the monitors hooked in and a periodic perplexity evaluation)
    cfg = load_config("configs/tiny.yaml", [f"run.dir={tmp_path}", "train.steps=30", "logging.interval=5",
                                            "checkpoint.interval=0", "logging.progress=false",
                                            "data.document_masking=true", "eval.interval=30", "eval.batches=1",
                                            "logging.sink_interval=10", "logging.layer_interval=10"])
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[0] > 8.0 and summary["last_loss"] < losses[0] - 1.0, losses
    ppl = [r["eval/ppl"] for r in rows if "eval/ppl" in r]
    assert ppl and all(math.isfinite(p) for p in ppl)


@pytest.mark.parametrize("case", ["causal-sink", "window-sink-gqa", "window-pinned", "not-causal"])
def test_triton_attention_runs_packed_documents_in_one_launch(case, monkeypatch):
    """The flash kernels take the documents themselves (programs laid out document after document): outputs, lse
    and every gradient (sink included) equal each document alone, fp32 against the fp64 oracle; lengths of 1, one
    under / exactly / over a query block (32 under the interpreter) and several blocks; one call for all."""
    pytest.importorskip("triton")
    from hylo.kernels.attention import triton as attention_triton

    calls, forward = [], attention_triton._flash_forward_op
    monkeypatch.setattr(attention_triton, "_flash_forward_op", lambda *a: calls.append(a[-1]) or forward(*a))
    lengths = [5, 32, 1, 33, 70, 31]
    t = sum(lengths)
    g = torch.Generator().manual_seed(11)
    h_kv = 1 if "gqa" in case else 2
    q = torch.randn(1, t, 2, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, t, h_kv, 16, generator=g, dtype=torch.float64) for _ in range(2))
    sink = torch.randn(2, generator=g, dtype=torch.float64)
    options = {"causal-sink": {}, "window-sink-gqa": {"window": 20}, "window-pinned": {"window": 9, "n_pinned": 3},
               "not-causal": {"causal": False}}[case]
    with_sink = "sink" in case
    w_out = torch.randn(1, t, 2, 16, generator=g, dtype=torch.float64)
    w_lse = torch.randn(1, 2, t, generator=g, dtype=torch.float64)

    def run(backend, dtype):
        xs = [x.to(dtype).requires_grad_() for x in (q, k, v, sink)]
        out, lse = attention(*xs[:3], sink=xs[3] if with_sink else None, return_lse=True, backend=backend,
                             cu_seqlens=cu(lengths), **options)
        ((out * w_out.to(dtype)).sum() + (lse * w_lse.to(dtype)).sum()).backward()
        grads = [x.grad for x in xs[:3]] + ([xs[3].grad] if with_sink else [])
        return [out.detach().double(), lse.detach().double(), *(x.double() for x in grads)]

    got, want = run("triton", torch.float32), run("naive", torch.float64)
    assert len(calls) == 1 and calls[0] is not None, "one call with the documents, not one per document"
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4, msg=lambda m, i=i: f"result {i}: {m}")
