"""The output head + cross-entropy with full logits vs chunked (`train.loss_chunk`): peak memory and time.

  python bench/bench_loss.py [--tokens 8192,32768] [--vocab 32768] [--dim 512] [--chunk 4096] [--no-record]

Each (tokens, path) runs forward + backward in a fresh process (so its peak resident memory is its own), fp32
on the CPU: the peak RSS above the inputs, the bytes saved for backward (counted with saved_tensors_hooks) and
the time.  On a GPU the same script reports `torch.cuda.max_memory_allocated` in bf16 autocast instead.
Prints a table and appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, publish  # noqa: E402


def one(tokens: int, vocab: int, dim: int, chunk: int) -> dict:
    """Runs in its own process: one forward + backward, measured."""
    import resource
    import time

    import torch

    from models.loss import chunked_cross_entropy, full_cross_entropy

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    hidden = torch.randn(tokens, dim, device=device, requires_grad=True)
    weight = (torch.randn(vocab, dim, device=device) * dim ** -0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device)
    base = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = chunked_cross_entropy(hidden, weight, targets, chunk) if chunk else \
                full_cross_entropy(hidden, weight, targets)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_gib": (peak - base) / 2**30, "saved_gib": sum(saved) / 2**30, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="8192,32768")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        tokens, chunk = map(int, args.one.split(","))
        print(json.dumps(one(tokens, args.vocab, args.dim, chunk)))
        return 0

    rows = [f"### bench_loss: output head + cross-entropy, full logits vs train.loss_chunk={args.chunk}",
            f"{machine()} · vocab {args.vocab}, d {args.dim}, one forward + backward per fresh process",
            "", "| tokens | path | peak memory above inputs GiB | saved for backward GiB | time s | time vs full |",
            "|---:|---|---:|---:|---:|---:|"]
    for tokens in [int(t) for t in args.tokens.split(",")]:
        full_time = None
        for chunk in (0, args.chunk):
            out = subprocess.run([sys.executable, __file__, "--one", f"{tokens},{chunk}", "--vocab", str(args.vocab),
                                  "--dim", str(args.dim)], capture_output=True, text=True, cwd=ROOT, timeout=1800)
            if out.returncode != 0:
                rows.append(f"| {tokens} | {'chunked' if chunk else 'full'} | failed: "
                            f"{out.stderr.strip().splitlines()[-1][:120]} | | | |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            full_time = r["seconds"] if chunk == 0 else full_time
            ratio = f"{r['seconds'] / full_time:.2f}x" if full_time else ""
            rows.append(f"| {tokens} | {'chunked ' + str(chunk) if chunk else 'full logits'} | {r['peak_gib']:.2f} | "
                        f"{r['saved_gib']:.3f} | {r['seconds']:.2f} | {ratio} |")
            print(rows[-1], flush=True)
    publish("\n".join(rows + [""]), record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
