"""Forward+backward time and peak memory of each op's chunk path against SDPA, at growing context.

  python bench/bench_ops.py [--lengths 2048 8192 32768] [--record]
  python bench/bench_ops.py --masked [--lengths 32768]     # document masking: packed vs unmasked


B=1, H=4, head dim 64 (BASED: q/k feature dim 16, v 64; RAT: chunk 16), float32 on the CPU.  Each (op, T)
runs in its own process so its peak resident memory is its own (reported above the process's baseline).
Targets (issue 3): at 32K lightning, BASED and RAT are each >= 5x faster than SDPA(is_causal=True), and their
time grows <= 4.5x from 8K to 32K.  With --masked, each op at the last length with packed documents
(`cu_seqlens`) of mean length 1K, 4K and one document, against the unmasked op.  Targets (issue 18): one
document no more than 10% slower than unmasked; attention faster as documents get shorter.  Prints a table and
appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, publish  # noqa: E402

OPS = ["sdpa", "lightning", "based", "rat", "attention_swa1024_sink"]
MASKED_OPS = ["attention_full_sink", "attention_swa1024_sink", "lightning", "based", "rat"]


def document_boundaries(t: int, mean: int):
    """cu_seqlens of documents with lengths drawn uniformly from [1, 2 * mean - 1] (mean `mean`), cut at t."""
    import torch

    gen = torch.Generator().manual_seed(1)
    bounds = [0]
    while bounds[-1] < t:
        n = 1 if mean <= 1 else int(torch.randint(1, 2 * mean, (1,), generator=gen))
        bounds.append(min(t, bounds[-1] + (t if mean >= t else n)))
    return torch.tensor(bounds, dtype=torch.int32)
TARGETS = ("lightning", "based", "rat")


def make_call(op: str, t: int, doc_mean: int = 0):
    import torch
    import torch.nn.functional as F

    from hylo.kernels.ops import attention, based_linear_attention, lightning_attention, rat_attention, tnl_slopes

    h, d = 4, 64
    gen = torch.Generator().manual_seed(0)
    docs = {"cu_seqlens": document_boundaries(t, doc_mean)} if doc_mean else {}

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_()

    if op == "sdpa":
        q, k, v = r(1, h, t, d), r(1, h, t, d), r(1, h, t, d)
        return [q, k, v], lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if op == "lightning":
        q, k, v = r(1, t, h, d, scale=0.1), r(1, t, h, d, scale=0.1), r(1, t, h, d)
        slopes = tnl_slopes(h, 0, 2)
        return [q, k, v], lambda: lightning_attention(q, k, v, slopes, **docs)
    if op == "based":
        q, k, v = r(1, t, h, 16), r(1, t, h, 16), r(1, t, h, d)
        return [q, k, v], lambda: based_linear_attention(q, k, v, **docs)
    if op == "rat":
        q, k, v = r(1, t, h, d), r(1, t, h, d), r(1, t, h, d)
        g = torch.rand(1, t, h, d, generator=gen).requires_grad_()
        return [q, k, v, g], lambda: rat_attention(q, k, v, g, 16, **docs)
    # attention_*_flash: the same call on backend="flash" (here torch's CPU flash kernel, sinks composed around it)
    backend = {"backend": "flash"} if op.endswith("_flash") else {}
    if op.removesuffix("_flash") == "attention_swa1024_sink":
        q, k, v, s = r(1, t, h, d), r(1, t, h, d), r(1, t, h, d), r(h)
        return [q, k, v, s], lambda: attention(q, k, v, window=1024, sink=s, **docs, **backend)
    if op.removesuffix("_flash") == "attention_full_sink":
        q, k, v, s = r(1, t, h, d), r(1, t, h, d), r(1, t, h, d), r(h)
        return [q, k, v, s], lambda: attention(q, k, v, sink=s, **docs, **backend)
    raise ValueError(op)


def run_one(op: str, t: int, reps: int, doc_mean: int = 0) -> dict:
    import torch

    torch.manual_seed(0)
    inputs, call = make_call(op, t, doc_mean)
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(reps + 1):  # the first run warms up allocator and caches
        start = time.perf_counter()
        out = call()
        out.backward(torch.ones_like(out))
        elapsed = time.perf_counter() - start
        if i:
            times.append(elapsed)
        for x in inputs:
            x.grad = None
        del out
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) / 1024
    return {"seconds": min(times), "peak_mib": peak_mib}  # best of reps, as timeit: the least disturbed run


def measure(op: str, t: int, reps: int, doc_mean: int = 0) -> dict:
    """One (op, length, documents) case in its own process."""
    cmd = [sys.executable, __file__, "--one", op, str(t), str(doc_mean), "--reps", str(reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        raise RuntimeError(f"{op} T={t} documents of {doc_mean}: {out.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def masked(args) -> int:
    t = args.lengths[-1]
    means = [0, t, 4096, 1024]  # 0 = unmasked; a mean of T = one document
    rows = []
    ok = True
    for op in args.ops or MASKED_OPS:
        reps = 1 if op == "attention_full_sink" else args.reps
        times = {}
        for mean in means:
            times[mean] = measure(op, t, reps, mean)["seconds"]
            print(f"  {op:>24} T={t} documents of mean {mean or 'unmasked'}: {times[mean]:.3f} s", flush=True)
        one_doc = times[t] / times[0]
        ok &= one_doc <= 1.10
        if op.startswith("attention_full"):
            ok &= times[1024] < times[4096] < times[t]
        rows.append(f"| {op} | {times[0]:.3f} | " + " | ".join(f"{times[m]:.3f} ({times[m] / times[0]:.2f}x)"
                                                         for m in means[1:]) + " |")
    lines = [f"### bench_ops --masked: forward+backward at T={t}, B=1 H=4 d=64, float32, packed documents",
             f"{machine()} · best of {args.reps} after a warm-up run (full attention: 1)", "",
             "| op | unmasked s | one document | mean 4K | mean 1K |", "|---|---:|---:|---:|---:|", *rows, "",
             "Targets (issue 18: one document <= 1.10x unmasked; full attention faster as documents get shorter): "
             + ("met" if ok else "NOT met"), ""]
    publish("\n".join(lines), record=args.record)
    return 0 if ok else 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ops", nargs="+", default=None, help=f"default {OPS} (with --masked: {MASKED_OPS})")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--masked", action="store_true", help="document masking: packed vs unmasked")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    if args.one:
        op, t, doc_mean = args.one[0], int(args.one[1]), int(args.one[2])
        print("RESULT " + json.dumps(run_one(op, t, args.reps, doc_mean)), flush=True)
        return 0
    if args.masked:
        return masked(args)
    args.ops = args.ops or OPS

    results: dict[tuple[str, int], dict] = {}
    for t in args.lengths:
        for op in args.ops:
            reps = 1 if (op == "sdpa" and t >= 32768) else args.reps
            results[op, t] = measure(op, t, reps)
            print(f"  {op:>24} T={t:>6}: {results[op, t]['seconds']:.3f} s, {results[op, t]['peak_mib']:.0f} MiB",
                  flush=True)


    lines = [
        "### bench_ops: forward+backward, B=1 H=4 d=64, float32",
        f"{machine()} · best of {args.reps} after a warm-up run (SDPA at 32K: 1)",
        "",
        "| op | " + " | ".join(f"T={t}: s (x vs SDPA) / MiB" for t in args.lengths) + " | growth "
        f"{args.lengths[-2]}->{args.lengths[-1]} |",
        "|---|" + "---:|" * (len(args.lengths) + 1),
    ]
    ok = True
    for op in args.ops:
        cells = []
        for t in args.lengths:
            r, ref = results[op, t], results["sdpa", t]
            cells.append(f"{r['seconds']:.3f} ({ref['seconds'] / r['seconds']:.1f}x) / {r['peak_mib']:.0f}")
        growth = results[op, args.lengths[-1]]["seconds"] / results[op, args.lengths[-2]]["seconds"]
        speedup = results["sdpa", args.lengths[-1]]["seconds"] / results[op, args.lengths[-1]]["seconds"]
        if op in TARGETS:
            ok &= speedup >= 5 and growth <= 4.5
        lines.append(f"| {op} | " + " | ".join(cells) + f" | {growth:.2f}x |")
    lines += ["", f"Targets (lightning, based, rat at T={args.lengths[-1]}: >= 5x faster than SDPA, growth <= 4.5x): "
              + ("met" if ok else "NOT met"), ""]
    table = "\n".join(lines)
    publish(table, record=args.record)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
