"""hylo's kernels against SDPA (flash and cuDNN backends), forward + backward, side by side in one run on one GPU.

  python bench/bench_kernels.py [--lengths 4096,16384,65536] [--tokens 65536] [--heads 16] [--dim 128]
  TRITON_INTERPRET=1 python bench/bench_kernels.py --smoke      (CPU: tiny shapes, checks the script only)
  python bench/bench_kernels.py --masked [--lengths 65536]      (document masking, issue 18)

B*T = --tokens at every length.  Median times from triton.testing.do_bench (GPU) of forward + backward.
Rows: SDPA causal (the reference; and SDPA's cuDNN backend on a GPU), hylo's flash backend (torch's FlashAttention
kernel with sinks and windows composed around it: causal, causal + sinks, window + sinks), our Triton flash
attention causal (deterministic dQ; and FA2-style atomic dQ),
sliding window W=4096 (and its speed-up over our
full causal at the same T), lightning (TNL), BASED linear attention (feature dim 16), RAT (L=16, as the layer
calls it: bf16 q/k/v, fp32 gate, RoPE after the scan; on Triton, with its summaries' softmax on torch's
FlashAttention, and the FlexAttention form of the paper's official code: bench/references.py), and
flash-linear-attention's lightning and BASED kernels on the same shapes when fla-core is installed.  Attention
rows report TFLOP/s (causal fwd+bwd = 3.5 x 2·B·H·T²·D); every row reports tokens/s and its speed-up over SDPA
at the same T.  Each row goes to bench/RESULTS.md as soon as it is measured.

With --masked: one packed sequence (B=1) of the last length, each op with `cu_seqlens` of documents of mean
length 1K and 4K and as one document, against the unmasked op (issue 18's targets: one document within 10% of
unmasked; attention faster as documents shorten).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.record import StreamedTable, machine  # noqa: E402
from bench.references import fla_available, fla_based, fla_lightning, rat_flex  # noqa: E402
from hylo.kernels.ops import (  # noqa: E402
    attention,
    based_linear_attention,
    lightning_attention,
    rat_attention,
    set_backward_dq,
    tnl_slopes,
)


def timed(fn, smoke: bool) -> float:
    """Median milliseconds of fn() (forward + backward)."""
    if smoke:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")


def fwd_bwd(op, *tensors):
    def run():
        for t in tensors:
            t.grad = None
        op(*tensors).float().sum().backward()
    return run


def atomic_dq(run):
    """run with FlashAttention-2's atomic dQ in the attention backward (train.attention_dq=atomic)."""
    def wrapped():
        set_backward_dq("atomic")
        try:
            run()
        finally:
            set_backward_dq("deterministic")
    return wrapped


def cases(b: int, t: int, h: int, d: int, device, dtype, window: int):
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    q, k, v = rand(b, t, h, d), rand(b, t, h, d), rand(b, t, h, d)

    def sdpa(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)

    slopes = tnl_slopes(h, 0, 24).to(device)
    gate = torch.rand(b, t, h, d, device=device, dtype=torch.float32).requires_grad_()
    qf, kf = rand(b, t, h, 16), rand(b, t, h, 16)
    def sdpa_cudnn(q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)

    sink = torch.zeros(h, device=device, requires_grad=True)
    yield "SDPA flash, causal", fwd_bwd(sdpa, q, k, v), "attn"
    if q.is_cuda:
        yield "SDPA cuDNN, causal", fwd_bwd(sdpa_cudnn, q, k, v), "attn"
    # hylo's flash backend: torch's FlashAttention kernel with sinks, windows and lse composed around it
    yield "flash (torch FA), causal", fwd_bwd(lambda q, k, v: attention(q, k, v, backend="flash"), q, k, v), "attn"
    yield "flash (torch FA), causal + sinks", fwd_bwd(
        lambda q, k, v, s: attention(q, k, v, sink=s, backend="flash"), q, k, v, sink), "attn"
    yield f"flash (torch FA), window {window} + sinks", fwd_bwd(
        lambda q, k, v, s: attention(q, k, v, window=window, sink=s, backend="flash"), q, k, v, sink), "window"
    yield "flash (triton), causal", fwd_bwd(lambda q, k, v: attention(q, k, v, backend="triton"), q, k, v), "attn"
    yield "flash (triton), causal + sinks", fwd_bwd(
        lambda q, k, v, s: attention(q, k, v, sink=s, backend="triton"), q, k, v,
        torch.zeros(h, device=device, requires_grad=True)), "attn"
    yield f"flash (triton), window {window}", fwd_bwd(
        lambda q, k, v: attention(q, k, v, window=window, backend="triton"), q, k, v), "window"
    yield "lightning (triton)", fwd_bwd(
        lambda q, k, v: lightning_attention(q, k, v, slopes, backend="triton"), q, k, v), "linear"
    if fla_available():  # flash-linear-attention's kernels on the same shapes (fla-core carried as a wheel)
        yield "lightning (fla chunk_lightning_attn)", fwd_bwd(
            lambda q, k, v: fla_lightning(q, k, v, 0, 24), q, k, v), "linear"
    yield "BASED (triton, d_f 16)", fwd_bwd(
        lambda q, k, v: based_linear_attention(q, k, v, backend="triton"), qf, kf, v), "linear"
    if fla_available():
        yield "BASED (fla fused_chunk_based, d_f 16)", fwd_bwd(fla_based, qf, kf, v), "linear"
    # RAT as the layer calls it: q, k, v in bf16, the gate in fp32, RoPE after the scan.
    yield "RAT L=16 (triton)", fwd_bwd(
        lambda q, k, v, g: rat_attention(q, k, v, torch.sigmoid(g), 16, rope_theta=1e4, backend="triton"),
        q, k, v, gate), "linear"
    yield "RAT L=16 (flash: summaries on torch FA)", fwd_bwd(
        lambda q, k, v, g: rat_attention(q, k, v, torch.sigmoid(g), 16, rope_theta=1e4, backend="flash"),
        q, k, v, gate), "linear"
    if q.is_cuda:  # FlexAttention has no backward on the CPU
        yield "RAT L=16 (FlexAttention, paper's form)", fwd_bwd(
            lambda q, k, v, g: rat_flex(q, k, v, torch.sigmoid(g), 16, rope_theta=1e4), q, k, v, gate), "linear"
    # last, so its extra compile (a new dK/dV specialisation) never delays the rows the GPU script must reach
    yield "flash (triton), causal, atomic dQ", atomic_dq(
        fwd_bwd(lambda q, k, v: attention(q, k, v, backend="triton"), q, k, v)), "attn"


def masked_cases(t: int, h: int, d: int, device, dtype, window: int):
    """(op name, documents' mean length or 0 for unmasked, fwd+bwd closure) on one packed sequence of t tokens."""
    from bench.bench_ops import document_boundaries

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    q, k, v = rand(1, t, h, d), rand(1, t, h, d), rand(1, t, h, d)
    qf, kf = rand(1, t, h, 16), rand(1, t, h, 16)
    sink = torch.zeros(h, device=device, requires_grad=True)
    gate = torch.rand(1, t, h, d, device=device).requires_grad_()
    slopes = tnl_slopes(h, 0, 24).to(device)
    ops = {
        "attention causal + sinks (torch FA)": (
            lambda q, k, v, s, **kw: attention(q, k, v, sink=s, backend="flash", **kw), (q, k, v, sink)),
        "attention causal + sinks": (lambda q, k, v, s, **kw: attention(q, k, v, sink=s, backend="triton", **kw),
                                     (q, k, v, sink)),
        f"attention window {window} + sinks": (lambda q, k, v, s, **kw: attention(
            q, k, v, window=window, sink=s, backend="triton", **kw), (q, k, v, sink)),
        "lightning": (lambda q, k, v, **kw: lightning_attention(q, k, v, slopes, backend="triton", **kw), (q, k, v)),
        "BASED": (lambda q, k, v, **kw: based_linear_attention(q, k, v, backend="triton", **kw), (qf, kf, v)),
        "RAT L=16": (lambda q, k, v, g, **kw: rat_attention(q, k, v, torch.sigmoid(g), 16, rope_theta=1e4,
                                                            backend="triton", **kw), (q, k, v, gate)),
    }
    for name, (op, tensors) in ops.items():
        for mean in (0, t, 4096, 1024):
            # boundaries on the host, as the trainer's loader would pass them: no device sync per call
            docs = {"cu_seqlens": document_boundaries(t, mean)} if mean else {}
            yield name, mean, fwd_bwd(lambda *x, op=op, docs=docs: op(*x, **docs), *tensors)


def run_masked(args, device, dtype) -> None:
    t = int(args.lengths.split(",")[-1])
    table = StreamedTable([f"### Document masking, Triton kernels, fwd+bwd, one packed sequence of T={t}, "
                           f"H={args.heads}, D={args.dim}, {dtype}", machine(), "",
                           "| op | documents | ms | vs unmasked |", "|---|---|---|---|"],
                          record=args.record and not args.smoke)
    base = None
    for name, mean, fn in masked_cases(t, args.heads, args.dim, device, dtype, args.window):
        label = "unmasked" if not mean else "one document" if mean >= t else f"mean {mean // 1024}K"
        try:
            ms = timed(fn, args.smoke)
        except Exception as err:  # a failing kernel is a table row, not the end of the run
            table.row(f"| {name} | {label} | failed: {type(err).__name__}: {str(err).splitlines()[0][:60]} | |")
            base = None if not mean else base
            continue
        base = ms if not mean else base
        ratio = f"{ms / base:.2f}x" if base else ""
        table.row(f"| {name} | {label} | {ms:.2f} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,65536")
    parser.add_argument("--tokens", type=int, default=65536, help="B*T at every length")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    parser.add_argument("--masked", action="store_true", help="document masking: packed vs unmasked")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    if args.smoke:
        args.lengths, args.tokens, args.heads, args.dim, args.window = "32,64", 64, 2, 16, 16
    if args.masked:
        run_masked(args, device, dtype)
        return
    table = StreamedTable([f"### Triton kernels vs SDPA, fwd+bwd, B*T={args.tokens}, H={args.heads}, D={args.dim}, "
                           f"{dtype}", machine() + (" (smoke run on the CPU interpreter: timings meaningless)"
                                                    if args.smoke else ""), "",
                           "| kernel | T | ms | TFLOP/s | Mtok/s | vs SDPA |", "|---|---|---|---|---|---|"],
                          record=args.record and not args.smoke)
    for t in map(int, args.lengths.split(",")):
        b = max(1, args.tokens // t)
        flops = 3.5 * 2 * b * args.heads * t * t * args.dim  # causal: half of 4·T²·D, fwd + 2.5x bwd
        base = full = None
        for name, fn, kind in cases(b, t, args.heads, args.dim, device, dtype, args.window):
            try:
                ms = timed(fn, args.smoke)
            except Exception as err:  # a failing kernel is a table row, not the end of the run
                table.row(f"| {name} | {t // 1024 or t}{'K' if t >= 1024 else ''} | failed: "
                          f"{type(err).__name__}: {str(err).splitlines()[0][:60]} | | | |")
                continue
            base = ms if base is None else base
            if name.startswith("flash (") and "causal" in name and full is None:
                full = ms
            tflops = f"{flops / ms / 1e9:.0f}" if kind == "attn" else ""
            note = f"{base / ms:.2f}x" + (f" ({full / ms:.1f}x full)" if kind == "window" and full else "")
            table.row(f"| {name} | {t // 1024 if t >= 1024 else t}{'K' if t >= 1024 else ''} | {ms:.2f} | "
                      f"{tflops} | {b * t / ms / 1e3:.2f} | {note} |")


if __name__ == "__main__":
    main()
