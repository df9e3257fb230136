"""Thirty seconds of truth on a GPU: every Triton kernel in bf16 on CUDA against the chunk path (PyTorch, fp32
inside), forward and backward, before anything is timed.

  python bench/gpu_smoke.py                           (CUDA: B=1, T=2048, H=4, D=128, bf16)
  TRITON_INTERPRET=1 python bench/gpu_smoke.py --cpu  (tiny shapes on the interpreter: checks the script only)

Each op's relative error ||triton - chunk|| / ||chunk|| for the output and for every input gradient; a row fails
above 3e-2 (bf16 rounds at 4e-3 per element: 3e-2 leaves room for long reductions, not for a wrong result).  Each
row goes to bench/RESULTS.md as soon as it is measured; exit status 1 if any row failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.record import StreamedTable, machine  # noqa: E402
from hylo.kernels.ops import attention, based_linear_attention, lightning_attention, rat_attention, tnl_slopes  # noqa: E402

TOLERANCE = 3e-2


def cases(t: int, h: int, d: int, device):
    """(name, op(backend, *inputs), inputs): the variants the layers run."""
    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=device).to(dtype)

    q, k, v = rand(1, t, h, d), rand(1, t, h, d), rand(1, t, h, d)
    sink = torch.zeros(h, device=device)
    yield "attention causal + sinks", lambda be, q, k, v, s: attention(q, k, v, sink=s, backend=be), [q, k, v, sink]
    yield "attention window 256 + sinks", (lambda be, q, k, v, s: attention(q, k, v, window=min(256, t // 2),
                                                                          sink=s, backend=be)), [q, k, v, sink]
    yield "attention GQA 4:1", lambda be, q, k, v: attention(q, k, v, backend=be), [q, k[:, :, :1], v[:, :, :1]]
    slopes = tnl_slopes(h, 0, 24).to(device)
    yield "lightning (TNL decay)", (lambda be, q, k, v: lightning_attention(q * 0.1, k * 0.1, v, slopes, backend=be)
                                    ), [q, k, v]
    yield "BASED (d_f 16)", lambda be, q, k, v: based_linear_attention(q, k, v, backend=be), [
        rand(1, t, h, 16), rand(1, t, h, 16), v]
    gate = torch.rand(1, t, h, d, device=device) * 0.9 + 0.05
    yield "RAT L=16 (bf16 q/k/v, fp32 gate, RoPE)", (lambda be, q, k, v, g: rat_attention(
        q, k, v, g, 16, rope_theta=1e4, backend=be)), [q, k, v, gate]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def compare(op, inputs) -> tuple[float, float]:
    results = {}
    for backend in ("triton", "chunk"):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        out = op(backend, *leaves)
        weight = torch.Generator(device=out.device).manual_seed(0)
        w = torch.randn(out.shape, generator=weight, device=out.device)
        grads = torch.autograd.grad((out.float() * w).sum(), leaves, allow_unused=True)
        results[backend] = (out, grads)
    (out, grads), (ref, ref_grads) = results["triton"], results["chunk"]
    grad_err = max(rel(g, r) for g, r in zip(grads, ref_grads, strict=True) if r is not None and r.norm() > 0)
    return rel(out, ref), grad_err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU interpreter")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    device = "cpu" if args.cpu else "cuda"
    t, h, d = (64, 2, 32) if args.cpu else (2048, 4, 128)
    table = StreamedTable([f"### GPU smoke: Triton vs chunk path, bf16, fwd+bwd, T={t}, H={h}, D={d}", machine(), "",
                           "| op | output rel. err | worst grad rel. err | ok |", "|---|---|---|---|"],
                          record=args.record and not args.cpu)
    failed = 0
    for name, op, inputs in cases(t, h, d, device):
        try:
            out_err, grad_err = compare(op, inputs)
            ok = out_err <= TOLERANCE and grad_err <= TOLERANCE
            table.row(f"| {name} | {out_err:.1e} | {grad_err:.1e} | {'yes' if ok else '**no**'} |")
        except Exception as err:  # a failing kernel is a row, not the end of the run
            ok = False
            table.row(f"| {name} | failed: {type(err).__name__}: {str(err).splitlines()[0][:80]} | | **no** |")
        failed += not ok
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
