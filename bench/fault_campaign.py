"""A fault campaign on the tiny model (CPU): every fault the lineage campaign of 2026-12 found, and its neighbours,
injected for real (damaged files, changed settings, kill -9 at chosen moments, bad arguments), each outcome
classified against what hylo promises:

  clean         refused in one line naming the problem (exit 2, no traceback, nothing written), or continued
                exactly (losses equal to the uninterrupted run's, the right checkpoint and config)
  silent-wrong  exit 0 but trained on other settings, data or weights than promised
  lost          a run's checkpoints or metrics overwritten or mixed with another's
  messy         refused, but with a traceback, a wrong exit code or more than one line

  python bench/fault_campaign.py [--record]

Prints one row per fault family (faults x outcome) and the faults that were not clean; `--record` appends the
table to bench/RESULTS.md.  The same cases are asserted in tests/test_lineage.py and tests/test_resume_chain.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.record import machine, publish  # noqa: E402

RUN = ["data.format=mqar", "data.mqar.n_keys=32", "data.mqar.n_values=32", "model.vocab_size=128",
       "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.pattern=[baseconv,full]", "train.seq_len=32",
       "train.batch_size=8", "data.prefetch=0", "logging.interval=1", "logging.progress=false",
       "logging.sink_interval=0", "logging.layer_interval=0", "train.deterministic=true", "checkpoint.interval=2"]
TEXT = ["model.d_model=32", "model.n_layers=2", "train.seq_len=32", "train.batch_size=2", "logging.progress=false",
        "logging.interval=1", "train.deterministic=true", "checkpoint.interval=2"]


def hylo(*args: str, module: str = "hylo.trainer.train", env: dict | None = None, cwd: Path = ROOT):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=900)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def settings(folder: Path) -> dict:
    """A checkpoint's config without where it lives and how far it goes (run.dir, checkpoint.resume, train.steps,
    which the resuming command sets)."""
    config = state(folder)["config"]
    config["run"].pop("dir")
    config["train"].pop("steps")
    config["checkpoint"].pop("resume")
    return config


def refusal(res, *needles: str) -> str:
    """A refusal's outcome: clean when exit 2, one line, no traceback and every needle said."""
    if res.returncode == 0:
        return "silent-wrong"
    lines = [line for line in res.stderr.strip().splitlines() if line.startswith("[hylo] error")]
    if res.returncode != 2 or "Traceback" in res.stderr or len(lines) != 1:
        return "messy"
    return "clean" if all(n in res.stderr for n in needles) else "messy"


def campaign(work: Path) -> list[tuple[str, str, str]]:
    """(family, fault, outcome) for every fault."""
    out: list[tuple[str, str, str]] = []
    base = work / "base"
    hylo(f"run.dir={base}", "train.steps=4", *RUN)
    straight = work / "straight"
    hylo(f"run.dir={straight}", "train.steps=6", *RUN)

    def copy(name: str) -> Path:
        shutil.copytree(base, work / name)
        return work / name

    # -- the config a resume continues with
    for key, value in (("train", "lr"), ("optim", "weight_decay"), ("schedule", "warmup_steps")):
        run = copy(f"edit_{value}")
        path = run / "checkpoints" / "step_4" / "trainer_state.json"
        edited = json.loads(path.read_text())
        edited["config"][key][value] = (edited["config"][key][value] or 0.1) * 10
        path.write_text(json.dumps(edited))
        res = hylo("--resume", f"run.dir={run}", "train.steps=6")
        ok = res.returncode == 0 and settings(run / "checkpoints" / "step_6") == settings(base / "checkpoints" /
                                                                                           "step_2")
        out.append(("config from a damaged newest checkpoint", f"{key}.{value} edited in step_4",
                    "clean" if ok else "silent-wrong"))
    run = copy("shard")
    hylo("--resume", f"run.dir={run}", "train.steps=6", "train.lr=1e-3")
    shard = next((run / "checkpoints" / "step_6").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out.append(("config from a damaged newest checkpoint", "step_6 shard damaged, other lr",
                refusal(hylo("--resume", f"run.dir={run}", "train.steps=8"), "failed verification", "train.lr")))

    # -- settings that change the data order
    for override in ("train.seed=7", "data.mqar.n_keys=30"):
        run = copy(f"order_{override.split('=')[0]}")
        res = hylo("--resume", f"run.dir={run}", "train.steps=6", override)
        expected = refusal(res, override.split("=")[0]) if "seed" in override else (
            "clean" if res.returncode == 0 and override.split("=")[0] in res.stdout else "silent-wrong")
        out.append(("settings changed on resume", override, expected))
    out.append(("settings changed on resume", "model.d_model=64",
                refusal(hylo("--resume", f"run.dir={copy('shape')}", "train.steps=6", "model.d_model=64"),
                        "model.d_model")))
    text = work / "text"  # (MQAR draws each step's batch afresh: its global batch may change; a corpus's may not)
    hylo(f"run.dir={text}", "train.steps=2", *TEXT)
    out.append(("settings changed on resume", "train.batch_size=4 (text)",
                refusal(hylo("--resume", f"run.dir={text}", "train.steps=4", "train.batch_size=4"),
                        "train.batch_size")))

    # -- lineages
    other = work / "other"
    hylo(f"run.dir={other}", "train.steps=4", "train.seed=1", *RUN)
    before = state(other / "checkpoints" / "step_4")
    res = hylo("--resume", str(base / "checkpoints" / "step_2"), f"run.dir={other}", "train.steps=4")
    intact = state(other / "checkpoints" / "step_4") == before
    out.append(("another run's checkpoints", "--resume A/step_2 run.dir=B",
                refusal(res, "holds another run's checkpoints") if intact else "lost"))
    elsewhere = work / "cwd"
    elsewhere.mkdir()
    own = copy("own")
    res = hylo("--resume", str(own / "checkpoints" / "step_2"), "train.steps=3", cwd=elsewhere)
    ok = res.returncode == 0 and (own / "checkpoints" / "step_3").is_dir() and not (elsewhere / "runs").exists()
    out.append(("another run's checkpoints", "--resume A/step_2 without run.dir", "clean" if ok else "lost"))
    redo = copy("redo")
    hylo("--resume", str(redo / "checkpoints" / "step_2"), "train.steps=6")
    steps = [json.loads(line)["step"] for line in (redo / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    out.append(("another run's checkpoints", "metrics of redone steps",
                "clean" if steps == sorted(set(steps)) else "lost"))

    # -- kill -9 at chosen moments, then a plain restart
    for kind, step in (("kill", 3), ("kill_in_save", 4), ("kill_in_prune", 6)):
        run = work / kind
        args = [f"run.dir={run}", "train.steps=6", "checkpoint.keep_last=2", *RUN]
        hylo(*args, module="tests.fault_run", env={"HYLO_FAULT": f"{kind}:{step}"})
        res = hylo(*args)
        ok = res.returncode == 0 and losses(run) == losses(straight)
        out.append(("kill -9, then a restart", f"{kind} at step {step}", "clean" if ok else "silent-wrong"))

    # -- bad arguments and inputs
    for bad in ("train.lr=[1,", "data.sources=[{name: a, path: x}"):
        out.append(("bad arguments", f"override {bad}",
                    refusal(hylo("train", "--dry-run", bad, module="hylo.trainer.cli"), "override")))
    for args, needle in ((["--prompt", "x", "--temperature", "nan"], "--temperature"),
                         (["--prompt", "x", "--max-new-tokens", "-5"], "--max-new-tokens"),
                         (["--prompt", ""], "--prompt is empty")):
        out.append(("bad arguments", f"generate {' '.join(args)}",
                    refusal(hylo("generate", "--checkpoint", str(base), *args, module="hylo.trainer.cli"), needle)))
    res = hylo("--print-config", "train.steps=3", "--resume", f"run.dir={work / 'nothing'}", "train.lr=0.5")
    out.append(("bad arguments", "overrides on both sides of --resume",
                "clean" if res.returncode == 0 and "lr: 0.5" in res.stdout else "messy"))
    data = work / "docs"
    data.mkdir()
    from hylo.trainer.data.sources import held_out

    docs = [t for t in (f"document {i}\n" for i in range(300)) if held_out(t, 0.99)][:3]
    for i, text in enumerate(docs):
        (data / f"{i}.txt").write_text(text)
    out.append(("bad arguments", "data.val_fraction=0.99 holding out every document",
                refusal(hylo(f"run.dir={work / 'vf'}", f"data.path={data}", "data.val_fraction=0.99", *TEXT),
                        "is empty")))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = campaign(Path(work))
    kinds = ("clean", "silent-wrong", "lost", "messy")
    by_family: dict[str, Counter] = defaultdict(Counter)
    for family, _, outcome in results:
        by_family[family][outcome] += 1
    rows = [f"### fault campaign (bench/fault_campaign.py) · {machine()}", "",
            "| family | faults | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for family, counts in by_family.items():
        rows.append(f"| {family} | {sum(counts.values())} | " + " | ".join(str(counts[k]) for k in kinds) + " |")
    total = Counter(outcome for _, _, outcome in results)
    rows.append(f"| **all** | {len(results)} | " + " | ".join(str(total[k]) for k in kinds) + " |")
    rows += [f"- not clean: {family} / {fault}: {outcome}" for family, fault, outcome in results if outcome != "clean"]
    publish("\n".join(rows) + "\n", record=args.record)
    return 0 if total["clean"] == len(results) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
