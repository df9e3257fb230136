"""The output head + cross-entropy, side by side: hylo's chunked loss (train.loss_chunk) against the full logits,
torch's own `F.linear_cross_entropy` with its chunked options (torch >= 2.13), Liger's fused linear cross-entropy
and Apple's cut-cross-entropy (each where installed and where it runs: the last two are CUDA Triton kernels).

  python bench/bench_loss.py [--tokens 4096] [--d-model 1024] [--vocab 32768,131072] [--dtype bf16|fp32]
                             [--repeats 3] [--record]

Per method: forward + backward time (median of the repeats, after a warm-up), peak memory above the inputs
(CUDA: max_memory_allocated; CPU: the resident set of a fresh process running it once, sampled every 0.5 ms,
above what it held before — a library's own C++ buffers never pass the dispatcher, only the OS sees them), and the
relative
error of the loss and of both gradients against a float64 reference — "exact" when all three are within the
dtype's tolerance (fp32 1e-5, bf16 2e-2).  Issue 27: the fastest exact one wins on the GPU; the CPU keeps ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.record import machine, publish  # noqa: E402
from hylo.models.loss import chunked_cross_entropy  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
ONE: dict = {}  # the settings a memory-measuring child process is started with


def methods(chunk: int) -> dict:
    """name -> loss(hidden, weight, targets) (mean over tokens), for the ones this machine can run."""
    found = {"hylo chunked": lambda h, w, t: chunked_cross_entropy(h, w, t, chunk, backend="hylo"),
             "full logits": lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t)}
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        found["torch linear_cross_entropy (chunked)"] = lambda h, w, t: F.linear_cross_entropy(h, w, t,
                                                                                               options=options)
    if torch.cuda.is_available():
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            found["liger fused linear CE"] = lambda h, w, t: liger(w, h, t)
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy

            found["cut-cross-entropy"] = lambda h, w, t: linear_cross_entropy(h, w, t)
        except ImportError:
            pass
    return found


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def measure(name: str, fn, hidden, weight, targets, reference, repeats: int) -> dict:
    def run():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = fn(h, w, targets)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    cuda = hidden.is_cuda
    loss, dh, dw = run()  # warm-up (and the values checked)
    errors = [rel(loss, reference[0]), rel(dh, reference[1]), rel(dw, reference[2])]
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = cpu_peak(name, hidden, weight)
    return {"ms": 1e3 * statistics.median(times), "peak": peak, "err": max(errors)}


def cpu_peak(name: str, hidden: torch.Tensor, weight: torch.Tensor) -> int:
    """Bytes the method's one forward + backward adds to a fresh process's peak resident set."""
    argv = [sys.executable, __file__, "--one", name, "--tokens", str(hidden.shape[0]), "--d-model",
            str(hidden.shape[1]), "--vocab", str(weight.shape[0]), "--dtype", ONE["dtype"],
            "--chunk", str(ONE["chunk"])]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"]


def one_process(args) -> None:
    """--one NAME: build the inputs, note the resident peak, run the method once, print the growth."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    vocab = int(args.vocab)
    hidden = torch.randn(args.tokens, args.d_model, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, args.d_model, dtype=dtype) * args.d_model**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (args.tokens,))
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before, peak, done = resident(), [0], threading.Event()

    def sample() -> None:  # the high-water mark of this process is older than the run: sample the resident set
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    methods(args.chunk)[args.one](hidden, weight, targets).backward()
    done.set()
    sampler.join()
    print(json.dumps({"peak": max(0, peak[0] - before)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--vocab", default="32768")
    parser.add_argument("--chunk", type=int, default=4096, help="hylo's train.loss_chunk")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # (the child process measuring one method's memory)
    args = parser.parse_args()
    ONE.update(dtype=args.dtype, chunk=args.chunk)
    if args.one:
        return one_process(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    rows = []
    for vocab in map(int, args.vocab.split(",")):
        hidden = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype)
        weight = torch.randn(vocab, args.d_model, device=device, dtype=dtype) * args.d_model**-0.5
        targets = torch.randint(0, vocab, (args.tokens,), device=device)
        h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
        loss64 = F.cross_entropy(h64 @ w64.t(), targets)
        loss64.backward()
        reference = (loss64.detach(), h64.grad, w64.grad)
        del h64, w64
        results = {}
        for name, fn in methods(args.chunk).items():
            try:
                results[name] = measure(name, fn, hidden, weight, targets, reference, args.repeats)
            except Exception as err:  # noqa: BLE001 - a method that cannot run here is a row saying why
                results[name] = {"error": f"{type(err).__name__}: {str(err)[:60]}"}
        ours = results["hylo chunked"]
        for name, r in results.items():
            if "error" in r:
                rows.append(f"| {vocab:,} | {name} | {r['error']} | | | |")
                continue
            exact = "yes" if r["err"] <= TOLERANCE[dtype] else f"no ({r['err']:.1e})"
            rows.append(f"| {vocab:,} | {name} | {r['ms']:,.1f} | {ours['ms'] / r['ms']:.2f}x | "
                        f"{r['peak'] / 2**20:,.0f} | {exact} |")
    table = "\n".join([
        f"### bench_loss: output head + cross-entropy, fwd+bwd, {args.tokens:,} tokens, d_model {args.d_model}, "
        f"{args.dtype} — {machine()}", "",
        "| vocab | method | ms | speed vs hylo | peak MiB | exact |", "|---:|---|---:|---:|---:|---|",
        *rows, ""])
    publish(table, record=args.record)


if __name__ == "__main__":
    main()
