"""The Triton kernels as registered torch ops (hylo::*_forward / *_backward via torch.library): a block of every
layer type, forced onto the Triton backend, compiles with torch.compile(fullgraph=True) as one graph holding its
op, and the compiled block equals the eager one, forward and backward.

On the CPU interpreter the ops are opaque custom ops (compile cannot trace interpreted kernels); on a GPU they are
`triton_op`s whose kernels Inductor sees through `wrap_triton`.  aot_eager runs dynamo's capture and AOT autograd
without code generation, which keeps this fast.
"""

import pytest
import torch

import hylo.kernels.dispatch as dispatch
from hylo.kernels.triton_support import triton_usable
from hylo.trainer.config import ModelConfig

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_usable(torch.empty(0, device=DEVICE)),
                                reason="needs a GPU or TRITON_INTERPRET=1")

OPS = {"full": "flash_attention_forward", "swa": "flash_attention_forward", "rat": "rat_forward",
       "based": "based_forward", "tnl": "lightning_forward"}


@pytest.mark.parametrize("kind", list(OPS))
def test_block_on_triton_compiles_in_one_graph(kind, monkeypatch):
    from hylo.models.lm import Block

    # `auto` picks Triton for CPU tensors too (the interpreter runs them).  Attention has sinks: never SDPA.
    monkeypatch.setattr(dispatch, "triton_fits", lambda *tensors: True)
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=6, n_heads=2, window=8)
    cfg.rat.chunk_size = 4
    cfg.attn.gate = True
    cfg.tnl.lrpe = True
    torch._dynamo.reset()
    block = Block(cfg, 1, kind).to(DEVICE)
    seen = []

    def recording_aot_eager(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(block, fullgraph=True, backend=recording_aot_eager)
    x = torch.randn(1, 24, 64, device=DEVICE, requires_grad=True)
    pos = torch.arange(24, device=DEVICE)
    eager = block(x, pos)
    (grad_eager,) = torch.autograd.grad(eager.square().sum(), x)
    out = compiled(x, pos)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert any(f"hylo.{OPS[kind]}" in target for target in seen), f"no hylo::{OPS[kind]} in the graph: {seen}"
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_eager, rtol=1e-5, atol=1e-6)

