"""The distillation claim, measured on the CPU: a hybrid made from a trained dense transformer in a tenth of its
tokens, against the same hybrid trained from scratch.

  python bench/bench_distill.py [--record] [--work DIR] [--teacher-steps 1000] [--types rat,based,tnl,swa]

  teacher      dense ([full] x 4, d_model 128, 4 heads, seq_len 256, 2,048 tokens a step) trained by hylo on the
               bundled corpus for --teacher-steps steps, its held-out loss evaluated 8 times along the way (the
               curve is printed: whether it flattened is read there)
  distilled    per layer type X: [X, X, X, full] (1 softmax layer in 4), started from the teacher
               (model.init_from: the attention layer and every MLP, norm and embedding copied, the new mixers from
               the attention weights), aligned (train.objective=align) then distilled (train.objective=distill,
               KL at T=1 + 0.1 x next-token loss; learning rates 5e-3 and 3e-3, picked on rat/tnl runs of this
               script among 1e-3, 3e-3 and 5e-3, lm_weight 0, 0.1 and 0.5, align share 0.2, 0.3 and 0.5); the two
               stages together take --budget of the teacher's tokens
  scratch 1x   the same hybrid from random weights on as many tokens as the distilled one saw (align + distill),
               the best of --scratch-lrs (its perplexity at the other learning rates is shown beside it)
  scratch 3x   ... on three times as many

Every model is scored with `hylo eval` on the bundled corpus's validation split (held-out perplexity over
--eval-batches x 8 sequences), MQAR (8 pairs, 256 sequences) and passkey (mean over lengths and depths).  Each
stage is its own `hylo` process; the table is printed (`--record` appends it to bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.record import machine, publish  # noqa: E402

SHAPE = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "train.seq_len=256", "train.batch_size=8",
         "model.window=64", "logging.progress=false", "eval.interval=0", "train.cpu_threads=0"]
TOKENS_PER_STEP = 8 * 256


def hylo(*args: str) -> str:
    """Run `hylo ARGS` in its own process; its stdout (raises with its stderr on failure)."""
    res = subprocess.run([sys.executable, "-m", "hylo.trainer.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"hylo {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return res.stdout


def train(run_dir: Path, steps: int, *overrides: str, reuse: bool = False) -> float:
    """Seconds to train `run_dir` (with `reuse`, those of the earlier run that trained it, when one did)."""
    timing = run_dir / "bench_seconds.json"
    if reuse and (run_dir / "checkpoints" / f"step_{steps}").is_dir() and timing.is_file():
        return json.loads(timing.read_text())["seconds"]
    start = time.perf_counter()
    hylo("train", f"run.dir={run_dir}", *SHAPE, f"train.steps={steps}", f"checkpoint.interval={steps}",
         f"logging.interval={max(1, steps // 10)}", *overrides)
    seconds = time.perf_counter() - start
    timing.write_text(json.dumps({"seconds": seconds}))
    return seconds


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def scores(run_dir: Path, eval_batches: int) -> dict[str, float]:
    ppl = last_json(hylo("eval", "--checkpoint", str(run_dir), "--task", "ppl", "--batches", str(eval_batches),
                         "--batch-size", "8"))
    mqar = last_json(hylo("eval", "--checkpoint", str(run_dir), "--task", "mqar", "--pairs", "8", "--samples",
                          "256"))
    passkey = last_json(hylo("eval", "--checkpoint", str(run_dir), "--task", "passkey", "--trials", "2"))
    cells = [a for row in passkey["accuracy"] for a in row]
    return {"loss": ppl["loss"], "ppl": ppl["ppl"], "mqar": mqar["accuracy"], "passkey": sum(cells) / len(cells)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--work", default="", help="where the runs go (default: a temporary folder)")
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--budget", type=float, default=0.1, help="align + distill tokens / the teacher's")
    parser.add_argument("--align-share", type=float, default=0.3, help="of the budget, the align stage's part")
    parser.add_argument("--types", default="rat,based,tnl,swa")
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--align-lr", type=float, default=5e-3)
    parser.add_argument("--distill-lr", type=float, default=3e-3)
    parser.add_argument("--lm-weight", type=float, default=0.1, help="distill.lm_weight")
    parser.add_argument("--scratch-lrs", default="1e-3,3e-3", help="from-scratch rows: the best of these")
    parser.add_argument("--reuse", action="store_true", help="keep the runs already in --work (the teacher's "
                        "included) instead of training them again: to try another recipe on the same teacher")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="hylo-distill-"))
    work.mkdir(parents=True, exist_ok=True)

    teacher = work / "teacher"
    interval = max(1, args.teacher_steps // 8)
    seconds = {"teacher": train(teacher, args.teacher_steps, "model.pattern=[full]", "model.attn.sink=false",
                                "train.lr=3e-3", f"eval.interval={interval}", f"eval.batches={args.eval_batches}",
                                "eval.batch_size=8", reuse=args.reuse)}
    curve = [(r["step"], r["eval/loss"]) for r in map(json.loads, (teacher / "metrics.jsonl").read_text().splitlines())
             if "eval/loss" in r]
    results = {"teacher": scores(teacher, args.eval_batches)}
    steps = max(2, round(args.budget * args.teacher_steps))
    align_steps = max(1, round(args.align_share * steps))
    distill_steps = steps - align_steps
    for kind in args.types.split(","):
        pattern = f"model.pattern=[{kind},{kind},{kind},full]"
        student = [pattern, "model.attn.sink=false"]
        recipe = f"a{args.align_lr:g}-d{args.distill_lr:g}-w{args.lm_weight:g}-s{args.align_share:g}"
        align, distilled = work / f"{kind}-align-{recipe}", work / f"{kind}-distilled-{recipe}"
        seconds[f"{kind} distilled"] = train(
            align, align_steps, *student, "train.objective=align", f"distill.teacher={teacher}",
            f"model.init_from={teacher}", f"train.lr={args.align_lr}", "schedule.warmup_steps=5", reuse=args.reuse)
        seconds[f"{kind} distilled"] += train(
            distilled, distill_steps, *student, "train.objective=distill", f"distill.teacher={teacher}",
            f"model.init_from={align}", f"distill.lm_weight={args.lm_weight}", f"train.lr={args.distill_lr}",
            "schedule.warmup_steps=5", reuse=args.reuse)
        results[f"{kind} distilled"] = scores(distilled, args.eval_batches)
        for times in (1, 3):  # the best of the learning rates tried, so the baseline is not a bad choice of ours
            name = f"{kind} scratch {times}x"
            tried = {}
            for lr in args.scratch_lrs.split(","):
                run = work / f"{kind}-scratch-{times}x-lr{float(lr):g}"
                spent = train(run, times * steps, *student, f"train.lr={lr}",
                              f"schedule.warmup_steps={min(30, times * steps // 10)}", reuse=args.reuse)
                tried[lr] = (scores(run, args.eval_batches), spent)
            best = min(tried, key=lambda lr: tried[lr][0]["ppl"])
            results[name] = {**tried[best][0], "lr": best,
                             "others": {lr: tried[lr][0]["ppl"] for lr in tried if lr != best}}
            seconds[name] = tried[best][1]
        print(json.dumps({name: results[name] for name in results if name.startswith(kind)}), flush=True)

    base = results["teacher"]["ppl"]
    teacher_tokens = args.teacher_steps * TOKENS_PER_STEP
    tokens = {"teacher": teacher_tokens}
    for name in results:
        if name != "teacher":
            tokens[name] = (3 if "3x" in name else 1) * steps * TOKENS_PER_STEP
    lines = [f"### Distillation: hybrids from a dense teacher vs from scratch ({machine()})", "",
             f"Teacher: [full] x 4, d_model 128, seq_len 256, {args.teacher_steps} steps ({teacher_tokens:,} tokens) "
             f"on the bundled corpus; held-out loss along the way: "
             + ", ".join(f"{loss:.3f} @ {step}" for step, loss in curve) + ".  Hybrids: [X, X, X, full]; "
             f"distilled = align {align_steps} steps + distill {distill_steps} steps "
             f"({steps * TOKENS_PER_STEP:,} tokens, {steps / args.teacher_steps:.0%} of the teacher's; align lr "
             f"{args.align_lr:g}, distill lr {args.distill_lr:g}, distill.lm_weight {args.lm_weight:g}).  "
             f"Held-out perplexity on {args.eval_batches * 8} sequences of the validation split.", "",
             "| model | tokens | held-out ppl | vs teacher | MQAR acc | passkey acc | train time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        name_shown = name
        if "lr" in r:
            others = ", ".join(f"lr {lr}: {p:.1f}" for lr, p in r["others"].items())
            name_shown = f"{name} (lr {r['lr']}; {others})"
        lines.append(f"| {name_shown} | {tokens[name]:,} | {r['ppl']:.2f} | {r['ppl'] / base:.3f}x | {r['mqar']:.3f} | "
                     f"{r['passkey']:.3f} | {seconds[name]:.0f} |")
    verdicts = []
    for kind in args.types.split(","):
        d, s1, s3 = (results[f"{kind} {what}"]["ppl"] for what in ("distilled", "scratch 1x", "scratch 3x"))
        within = d / base <= 1.05
        verdicts.append(f"{kind}: {d / base:.3f}x the teacher's ppl ({'within' if within else 'NOT within'} 5%), "
                        f"{'ahead of' if d < min(s1, s3) else 'NOT ahead of'} both from-scratch rows "
                        f"({s1:.1f}, {s3:.1f})")
    lines += ["", "Goal (<= 1.05x the teacher's perplexity at <= 10% of its tokens, ahead of both from-scratch "
              "rows): " + "; ".join(verdicts) + ".", ""]
    publish("\n".join(lines), record=args.record)
    print(f"runs kept in {work}")


if __name__ == "__main__":
    main()
