"""Resume after resume: a checkpoint saved by a resumed run must hold the same data position as the uninterrupted
run's, for every source kind, so any chain of resumes reproduces the uninterrupted batches and losses.

The save points sit inside long documents, after the first one of the stream: where a resumed run saves while
the packer is still inside the document it resumed in (the case that once recorded the start of the corpus).
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hylo.trainer.config import DataConfig
from hylo.trainer.data.loader import DataLoader
from hylo.trainer.data.shards import write_shards
from hylo.trainer.data.tokenizer import load_tokenizer
from tests.conftest import ROOT, run_module, subprocess_env
from tests.test_checkpoint import losses, torchrun

TOK = load_tokenizer()
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
STEPS = 48  # loader steps of SEQ_LEN x GLOBAL_BATCH = 32 tokens: documents span 4 to 20 of them
SEQ_LEN, GLOBAL_BATCH = 16, 4


def long_documents(n: int, words: tuple[int, int], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(*words)))) + f" document {i}." for i in range(n)]


def write_source(kind: str, root) -> DataConfig:
    """The same long documents as a source of `kind`: text files, one JSONL file, one Parquet file, a local
    folder read as a Hugging Face dataset, or token shards."""
    docs = long_documents(14, (60, 300))
    root.mkdir(parents=True, exist_ok=True)
    if kind == "text":
        for i, doc in enumerate(docs):
            (root / f"doc{i:02d}.txt").write_text(doc)
        return DataConfig(path=str(root))
    if kind in ("jsonl", "hf"):
        (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
        return DataConfig(path=str(root), format="hf") if kind == "hf" else DataConfig(path=str(root / "docs.jsonl"))
    if kind == "parquet":
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow

        pq.write_table(pyarrow.Table.from_pylist([{"text": d} for d in docs]), root / "docs.parquet", row_group_size=3)
        return DataConfig(path=str(root / "docs.parquet"))
    assert kind == "tokens"
    write_shards(docs, TOK, root / "shards", shard_tokens=2_000)
    return DataConfig(path=str(root / "shards"))


def loaders(cfg: DataConfig, world: int) -> list[DataLoader]:
    return [DataLoader(cfg, TOK, seq_len=SEQ_LEN, global_batch=GLOBAL_BATCH, micro_batch=GLOBAL_BATCH // world,
                       rank=r, world=world, seed=7) for r in range(world)]


def run_chain(cfg: DataConfig, world: int, resumes: list[int]) -> tuple[list[torch.Tensor], list[dict]]:
    """The global batch of every step to STEPS, stopping and resuming (through JSON, as a checkpoint does) after
    each step in `resumes`; also the state saved at each stop."""
    batches, saved, state, step = [], [], None, 0
    for stop in [*resumes, STEPS]:
        ranks = loaders(cfg, world)
        for loader in ranks:
            if state is not None:
                loader.load_state_dict(json.loads(json.dumps(state)))
        while step < stop:
            batches.append(torch.cat([next(loader).flatten(0, 1) for loader in ranks]))
            step += 1
        states = [loader.state_dict() for loader in ranks]
        assert all(s == states[0] for s in states), "ranks disagree on the data position"
        state = states[0]
        saved.append(state)
        for loader in ranks:
            loader.close()
    return batches, saved


def documents_at(cfg: DataConfig) -> list:
    """The document holding the next token after each step of the uninterrupted run (streaming sources)."""
    (loader,) = loaders(cfg, 1)
    at = []
    for _ in range(STEPS):
        next(loader)
        packer = loader.state_dict()["packer"]
        at.append(json.dumps([packer["epoch"], packer["doc_state"]], sort_keys=True))
    loader.close()
    return at


def inside_one_later_document(cfg: DataConfig, points: list[int]) -> bool:
    """Whether every point in `points` lies inside one document that is not the stream's first."""
    at = documents_at(cfg)
    return len({at[p - 1] for p in points}) == 1 and at[points[0] - 1] != at[0]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain_sources")
    return {kind: write_source(kind, root / kind) for kind in ("text", "jsonl", "parquet", "hf", "tokens")}


@pytest.fixture(scope="module")
def straight(sources):
    return {kind: run_chain(cfg, 1, [])[0] for kind, cfg in sources.items()}


def fixed_points(cfg: DataConfig) -> list[int]:
    """Three stops one step apart inside one document after the first (the uninterrupted run says where)."""
    at = documents_at(cfg)
    for p in range(2, STEPS - 3):
        if at[p - 1] != at[0] and at[p - 1] == at[p] == at[p + 1]:
            return [p, p + 1, p + 2]
    raise AssertionError("the corpus has no document long enough for the chain")


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet", "hf", "tokens"])
def test_chains_of_resumes_inside_a_long_document_equal_the_straight_run(sources, straight, kind, world):
    cfg = sources[kind]
    points = [9, 10, 11] if kind == "tokens" else fixed_points(cfg)
    for resumes in (points[:2], points):  # two resumes, then three
        batches, _ = run_chain(cfg, world, resumes)
        for step, (got, want) in enumerate(zip(batches, straight[kind], strict=True), 1):
            assert torch.equal(got, want), f"{kind}, {world} rank(s), resumed after {resumes}: step {step} differs"


@pytest.mark.parametrize("kind", ["text", "parquet", "tokens"])
def test_chains_at_seeded_random_points_equal_the_straight_run(sources, straight, kind, fresh_seed):
    rng = random.Random(fresh_seed)
    for _ in range(2):
        resumes, step = [], rng.randint(3, 12)
        while step < STEPS and len(resumes) < 4:
            resumes.append(step)
            step += rng.randint(1, 4)  # often inside the document the previous resume started in
        world = rng.choice([1, 2])
        batches, _ = run_chain(sources[kind], world, resumes)
        for step, (got, want) in enumerate(zip(batches, straight[kind], strict=True), 1):
            assert torch.equal(got, want), f"{kind}, {world} rank(s), resumed after {resumes}: step {step} differs"


def test_a_resumed_save_records_the_document_it_is_in(sources):
    """The saved state itself, not only the batches: after resuming inside a document, a save taken still inside it
    names that document, as the uninterrupted run's does."""
    cfg = sources["text"]
    points = fixed_points(cfg)
    assert inside_one_later_document(cfg, points)
    _, saved = run_chain(cfg, 1, points[:2])
    (loader,) = loaders(cfg, 1)
    for _ in range(points[1]):
        next(loader)
    assert saved[1] == json.loads(json.dumps(loader.state_dict()))
    loader.close()


# ------------------------------------------------------------------------------------------------- end to end
TRAIN = ["model.d_model=64", "model.n_layers=2", "train.batch_size=4", "train.seq_len=64", "logging.interval=1",
         "logging.progress=false", "train.deterministic=true", "logging.sink_interval=0", "checkpoint.interval=2"]
TRAIN_STEPS = 24


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    """Documents of 1,000 to 3,000 tokens: each spans several steps of 256 tokens."""
    root = tmp_path_factory.mktemp("long_corpus")
    for i, doc in enumerate(long_documents(12, (500, 1500), seed=1)):
        (root / f"doc{i:02d}.txt").write_text(doc)
    return root


@pytest.fixture(scope="module")
def reference(long_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    res = run_module(["-m", "hylo.trainer.train", f"run.dir={run_dir}", f"data.path={long_corpus}",
                      f"train.steps={TRAIN_STEPS}", *TRAIN])
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def chain_points(reference) -> list[int]:
    """Three consecutive save steps inside one document after the first, read off the reference's checkpoints."""
    def document(step):
        state = json.loads((reference / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())
        return json.dumps([state["data"]["packer"]["epoch"], state["data"]["packer"]["doc_state"]], sort_keys=True)

    saves = list(range(2, TRAIN_STEPS, 2))
    for a, b, c in zip(saves, saves[1:], saves[2:], strict=False):
        if document(a) == document(b) == document(c) != document(2):
            return [a, b, c]
    raise AssertionError("no document of the long corpus spans three saves")


@pytest.mark.parametrize("world", [1, 2])
def test_training_resumed_three_times_inside_a_document_equals_the_straight_run(long_corpus, reference, tmp_path,
                                                                               free_port, world):
    want = losses(reference)
    if world == 2:  # the 2-rank run of the same global batch computes the same losses to rounding
        ref2 = tmp_path / "reference2"
        res = torchrun(2, free_port, [f"run.dir={ref2}", f"data.path={long_corpus}", f"train.steps={TRAIN_STEPS}",
                                      *TRAIN])
        assert res.returncode == 0, res.stderr[-3000:]
        want = losses(ref2)
    run_dir = tmp_path / "chain"
    for stop in [*chain_points(reference), TRAIN_STEPS]:  # every run resumes from the one before's last save
        args = [f"run.dir={run_dir}", f"data.path={long_corpus}", f"train.steps={stop}", *TRAIN]
        res = torchrun(2, free_port, args) if world == 2 else run_module(["-m", "hylo.trainer.train", *args])
        assert res.returncode == 0, res.stderr[-3000:]
    assert losses(run_dir) == want  # exact, every step


def kill_until_done(start, kill, rng: random.Random, fraction: tuple[float, float], duration: float,
                    max_kills: int) -> int:
    """Start a run and kill it after a random fraction of the uninterrupted run's `duration`, up to `max_kills`
    times, restarting it each time, then let it finish (exit 0); returns how many kills landed."""
    kills = 0
    for _attempt in range(5 * max_kills):
        proc = start()
        try:
            proc.wait(timeout=rng.uniform(*fraction) * duration if kills < max_kills else 900)
        except subprocess.TimeoutExpired:
            kill(proc)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
        return kills
    raise AssertionError("the run never completed")


@pytest.mark.slow
def test_chaos_random_kills_then_resumes_reproduce_every_loss(long_corpus, tmp_path, fresh_seed):
    """The fault campaign as a test: kill -9 a run at random moments (start-up, mid-step, mid-save, mid-prune)
    up to eight times, resume each time with auto-resume, and compare every logged loss with the uninterrupted
    run's."""
    rng = random.Random(fresh_seed)
    steps = 400
    args = [sys.executable, "-m", "hylo.trainer.train", f"data.path={long_corpus}", f"train.steps={steps}", *TRAIN,
            "checkpoint.interval=3", "checkpoint.keep_last=2"]
    started = time.monotonic()
    reference = subprocess.run([*args, f"run.dir={tmp_path / 'reference'}"], cwd=ROOT, env=subprocess_env(),
                               capture_output=True, text=True, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]
    duration = time.monotonic() - started  # kills land between start-up and the end of the whole run's time
    run_dir = tmp_path / "chaos"
    kills = kill_until_done(lambda: subprocess.Popen([*args, f"run.dir={run_dir}"], cwd=ROOT, env=subprocess_env(),
                                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
                            lambda proc: proc.send_signal(signal.SIGKILL), rng, (0.1, 0.45), duration, 8)
    assert kills >= 4, f"only {kills} kills landed before the run finished"
    assert losses(run_dir) == losses(tmp_path / "reference")
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))


@pytest.mark.slow
def test_a_kill_in_the_middle_of_pruning_resumes_exactly(long_corpus, reference, tmp_path):
    """A real SIGKILL between renaming a pruned folder and deleting it: the next start removes the leftover, resumes
    from the newest complete checkpoint, and every loss equals the uninterrupted run's."""
    run = tmp_path / "run"
    args = [f"run.dir={run}", f"data.path={long_corpus}", f"train.steps={TRAIN_STEPS}", *TRAIN,
            "checkpoint.keep_last=2"]
    killed = run_module(["-m", "tests.fault_run", *args], env={"HYLO_FAULT": "kill_in_prune:6"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (run / "checkpoints" / "step_2.pruning").is_dir()  # killed mid-prune: renamed, not yet deleted
    resumed = run_module(["-m", "hylo.trainer.train", *args])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_2.pruning" in resumed.stdout + resumed.stderr  # the leftover removed, said in one line
    assert "resuming from" in resumed.stdout and "step_4" in resumed.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{TRAIN_STEPS - 2}",
                                                                         f"step_{TRAIN_STEPS}"]
    assert losses(run) == losses(reference)


@pytest.mark.slow
def test_a_two_rank_mixture_killed_at_random_reproduces_every_loss(tmp_path, fresh_seed):
    """Two ranks training a three-source mixture (one source small enough to turn its epochs), the whole job
    killed with SIGKILL at random moments up to four times and resumed each time: every logged loss equals the
    uninterrupted two-rank run's."""
    from tests.test_mixture import write_source

    sources = {name: write_source(tmp_path / name, n, words, name, seed) for name, n, words, seed in
               (("web", 40, (20, 200), 0), ("code", 20, (20, 120), 1), ("books", 3, (80, 200), 2))}
    mix = ("data.sources=[" + ", ".join(f"{{name: {n}, path: '{p}', weight: {w}}}" for (n, p), w in
                                        zip(sources.items(), (0.6, 0.3, 0.1), strict=True)) + "]")
    steps = 40
    args = [mix, f"train.steps={steps}", *TRAIN, "checkpoint.keep_last=2"]
    rng = random.Random(fresh_seed)

    def job(run_dir: Path) -> subprocess.Popen:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
               f"--rdzv_endpoint=127.0.0.1:{port}", "-m", "hylo.trainer.train", f"run.dir={run_dir}", *args]
        return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    started = time.monotonic()
    reference = job(tmp_path / "reference")
    assert reference.wait(timeout=900) == 0, reference.stderr.read()[-3000:]
    duration = time.monotonic() - started
    run_dir = tmp_path / "chaos"
    # the whole job at once (the agent and both ranks), as a lost node
    kills = kill_until_done(lambda: job(run_dir), lambda proc: os.killpg(proc.pid, signal.SIGKILL), rng, (0.3, 0.7),
                            duration, 4)
    assert kills >= 2, f"only {kills} kills landed before the run finished"
    assert losses(run_dir) == losses(tmp_path / "reference")
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))


def test_a_half_written_metrics_line_is_cut_before_a_resumed_run_appends(tmp_path):
    from hylo.trainer.run_log import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 8.0}\n{"step": 2, "train/lo')  # killed here
    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log(2, {"train/loss": 7.5})
    logger.close()
    assert losses(tmp_path) == {1: 8.0, 2: 7.5}
