"""Context parallelism: bytes each rank sends per forward+backward, against the analytic minimum, and the
activation memory each rank keeps for backward, at N = 1, 2, 4 CP ranks.

  python bench/bench_cp.py [--seq 4096] [--record]

One layer op per row (B=1, H=4 query heads, 2 k/v heads, d=64, float32, T=--seq), run under torchrun with gloo
on the CPU.  Bytes come from instrumenting the collectives (parallel.context.COMM); activation memory is the
storage saved for backward (autograd saved-tensor hooks, the op's inputs included), per rank.
The minimum counts what the math must move:
  ring       every rank must see every other rank's K/V once (forward), and again in backward plus the dK/dV
             on their way home: (N-1)/N * T * (2 Hkv d) bytes per pass
  ulysses    all-to-alls of q, k, v, out forward and their gradients backward: (N-1)/N of each local tensor
  halo       the W-1 (or kernel-1) tokens before each local segment, forward and their gradient backward
  state      each rank's per-segment states reach the N-1 others (and back as gradients)
  rat        each rank's chunk summaries (1/L of its k and v) reach the N-1 others (and back)
Prints a table (`--record` appends it to bench/RESULTS.md).

  python bench/bench_cp.py --balance [--seq 131072] [--record]

Load balance with packed documents (issue 18), by arithmetic on the layouts: the causal attention work (visible
query-key pairs, within documents) each of N ranks does for full attention, under the zigzag layout (ring and
the hybrid's ring slots) and, for comparison, plain contiguous pieces, with documents of mean length 1K and 4K
(lengths uniform in [1, 2 mean)) and as one document.  Ulysses needs no row: every rank attends the whole
sequence on H/N heads, so its work is equal by construction; linear layers' work is their tokens, equal too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, publish  # noqa: E402

B, H, HKV, D, W, K, L, C = 1, 4, 2, 64, 512, 3, 16, 256
F32 = 4


def cases(n: int) -> list[tuple[str, str]]:
    out = [("full", "ring"), ("full", "ulysses")] + ([("full", "hybrid")] if n == 4 else [])
    return out + [(kind, "ring") for kind in ("swa", "baseconv", "tnl", "based", "rat")]


def minimum_bytes(kind: str, mode: str, n: int, t: int, n_seg: int) -> float:
    if n == 1:
        return 0.0
    local = t // n
    if kind == "full" and mode == "ring":
        kv = 2 * HKV * D * F32
        return (n - 1) / n * t * kv * 3  # K/V forward, K/V again and dK/dV backward
    if kind == "full" and mode == "ulysses":
        frac = (n - 1) / n
        return 2 * frac * local * (2 * H + 2 * max(HKV, n)) * D * F32  # q, out (H heads), k, v (replicated to N)
    if kind == "full" and mode == "hybrid":  # 2-way Ulysses inside, N/2-way ring across
        u, r = 2, n // 2
        kv_heads = max(HKV, u)
        ulysses = 2 * (u - 1) / u * local * (2 * H + 2 * kv_heads) * D * F32
        ring = (r - 1) / r * t * 2 * (kv_heads // u) * D * F32 * 3
        return ulysses + ring
    if kind in ("swa", "baseconv"):  # the halo tokens that live on another rank, forward and backward
        from hylo.parallel.halo import halo_plan
        from hylo.parallel.layout import cp_segments

        h, width = (W - 1, 2 * HKV * D) if kind == "swa" else (K - 1, C)
        pieces, _ = halo_plan(cp_segments(t, n, mode), lambda a, h=h: max(0, a - h))
        worst = max(sum(p.length for p in pieces if p.src == r and p.dst != r) for r in range(n))
        return 2 * worst * width * F32
    if kind == "tnl":
        return 2 * (n - 1) * n_seg * H * D * D * F32
    if kind == "based":
        f = 1 + 16 + 256
        return 2 * (n - 1) * n_seg * H * (f * D + f) * F32
    if kind == "rat":
        return 2 * (n - 1) * 2 * (local // L) * H * D * F32
    raise ValueError(kind)


def run_op(kind: str, mode: str, t: int, ctx):
    """One forward+backward; returns (saved bytes for backward, output)."""
    import torch

    from hylo.kernels.ops import (
        attention,
        based_linear_attention,
        lightning_attention,
        rat_attention,
        short_conv,
        tnl_slopes,
    )

    gen = torch.Generator().manual_seed(0)
    t_loc = t if ctx is None else t // ctx.size

    def r(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    if kind in ("full", "swa"):
        args = [r(B, t_loc, H, D), r(B, t_loc, HKV, D), r(B, t_loc, HKV, D)]
        kw = {"window": W if kind == "swa" else None, "sink": r(H)}
        if ctx is None:
            fn = attention
        elif kind == "full":
            from hylo.parallel.strategies import full_attention_op

            fn = full_attention_op(ctx)
        else:
            from hylo.parallel.halo import HaloWindowAttention

            fn = HaloWindowAttention(ctx)
    elif kind == "baseconv":
        args, kw = [r(B, t_loc, C), r(C, K), r(C)], {}
        from hylo.parallel.halo import HaloConv

        fn = short_conv if ctx is None else HaloConv(ctx)
    elif kind == "tnl":
        args, kw = [r(B, t_loc, H, D), r(B, t_loc, H, D), r(B, t_loc, H, D), tnl_slopes(H, 0, 2)], {}
        from hylo.parallel.state_passing import LightningCP

        fn = lightning_attention if ctx is None else LightningCP(ctx)
    elif kind == "based":
        args, kw = [r(B, t_loc, H, 16), r(B, t_loc, H, 16), r(B, t_loc, H, D)], {}
        from hylo.parallel.state_passing import BasedCP

        fn = based_linear_attention if ctx is None else BasedCP(ctx)
    else:
        args = [r(B, t_loc, H, D), r(B, t_loc, H, D), r(B, t_loc, H, D),
                torch.rand(B, t_loc, H, D, generator=gen).requires_grad_(), L]
        kw = {}
        from hylo.parallel.summary_exchange import RatCP

        fn = rat_attention if ctx is None else RatCP(ctx)

    storages: dict[int, int] = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn(*args, **kw)
    out.backward(torch.ones_like(out))
    return sum(storages.values())


def worker(t: int) -> None:
    import torch
    import torch.distributed as dist

    from hylo.parallel.dims import ParallelDims
    from hylo.parallel.layout import COMM
    from hylo.parallel.strategies import make_context

    dist.init_process_group("gloo")
    n = dist.get_world_size()
    mesh = ParallelDims.build(n, dist.get_rank(), n, torch.device("cpu")).mesh
    contexts = {}
    results = []
    for kind, mode in cases(n):
        if mode not in contexts:
            contexts[mode] = make_context(mesh, t, mode, 2 if mode == "hybrid" else 1)
        ctx = contexts[mode]
        ctx.tag = kind
        COMM.sent.clear()
        COMM.enabled = True
        saved = run_op(kind, mode, t, ctx)
        COMM.enabled = False
        sent = torch.tensor([float(sum(COMM.sent.values())), float(saved)])
        everyone = [torch.zeros(2) for _ in range(n)]
        dist.all_gather(everyone, sent)
        results.append({"kind": kind, "mode": mode, "sent": max(x[0].item() for x in everyone),
                        "saved": max(x[1].item() for x in everyone), "n_seg": len(ctx.local_segments)})
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.destroy_process_group()


def balance(seq: int, record: bool) -> None:
    import torch

    from bench.bench_ops import document_boundaries
    from hylo.parallel.layout import SequenceLayout, cp_segments

    def pairs(layout: SequenceLayout, rank: int) -> int:
        # queries [s, s + n) of a document starting at d see s - d + 1 ... s - d + n keys
        return sum(n * (s - layout.doc_start(s)) + n * (n + 1) // 2 for s, n, _ in layout.pieces(rank))

    rows = [f"### bench_cp --balance: causal attention work per rank with packed documents, T={seq}",
            f"{machine()} · arithmetic on the layouts (visible query-key pairs inside documents)", "",
            "| ranks | documents | zigzag max/mean | zigzag min/mean | contiguous max/mean | contiguous min/mean |",
            "|---|---|---:|---:|---:|---:|"]
    for n in (4, 8):
        for mean in (seq, 4096, 1024):
            bounds = tuple(document_boundaries(seq, mean).tolist())
            cells = []
            for mode in ("ring", "ulysses"):  # ulysses' segments are the contiguous layout
                layout = SequenceLayout(cp_segments(seq, n, mode), bounds)
                work = torch.tensor([pairs(layout, r) for r in range(n)], dtype=torch.float64)
                cells += [f"{(work.max() / work.mean()).item():.3f}", f"{(work.min() / work.mean()).item():.3f}"]
            label = "one document" if mean >= seq else f"mean {mean // 1024}K ({len(bounds) - 1} documents)"
            rows.append(f"| {n} | {label} | " + " | ".join(cells) + " |")
    publish("\n".join(rows) + "\n", record=record)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=None, help="default 4096 (131072 with --balance)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--balance", action="store_true", help="load balance with packed documents (arithmetic)")
    args = parser.parse_args()
    if args.balance:
        balance(args.seq or 131072, args.record)
        return 0
    args.seq = args.seq or 4096
    if args.worker:
        worker(args.seq)
        return 0

    single = {kind: run_op(kind, "none", args.seq, None) for kind, _ in cases(1)}
    measured = {}
    for n in (2, 4):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                              __file__, "--worker", "--seq", str(args.seq)], capture_output=True, text=True, env=env,
                             cwd=ROOT)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            return 1
        measured[n] = {(r["kind"], r["mode"]): r for r in json.loads(line[0][7:])}


    mib = 2**20
    rows = [f"### bench_cp: bytes sent per rank (forward+backward) and activation memory per rank, T={args.seq}",
            f"{machine()}, gloo · B={B} H={H} Hkv={HKV} d={D} fp32, window {W}, conv kernel {K} x {C}, RAT L={L}",
            "",
            "| layer | mode | sent MiB N=2 (x min) | sent MiB N=4 (x min) | saved MiB N=1 | N=2 | N=4 | N=4 / N=1 |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for kind, mode in cases(4):
        cells = []
        for n in (2, 4):
            r = measured[n].get((kind, mode))
            if r is None:
                cells.append("-")
                continue
            low = minimum_bytes(kind, mode, n, args.seq, r["n_seg"])
            cells.append(f"{r['sent'] / mib:.2f} ({r['sent'] / low:.2f}x)")
        saved = [single[kind]] + [measured[n][(kind, mode)]["saved"] if (kind, mode) in measured[n] else None
                                  for n in (2, 4)]
        mem = [f"{s / mib:.1f}" if s is not None else "-" for s in saved]
        ratio = f"{saved[2] / saved[0]:.2f}" if saved[2] is not None and saved[0] else "-"
        rows.append(f"| {kind} | {mode} | {cells[0]} | {cells[1]} | {mem[0]} | {mem[1]} | {mem[2]} | {ratio} |")
    table = "\n".join(rows + [""])
    publish(table, record=args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
