"""Context parallelism on CPU (gloo): every CP op against one rank, and whole-model runs against one rank."""

import json

import pytest

from hylo.parallel.layout import cp_segments
from hylo.trainer.config import load_config
from hylo.trainer.trainer import run_problem
from tests.conftest import run_module


def run_worker(n, seed, which, port):
    res = run_module(["-m", "torch.distributed.run", f"--nproc_per_node={n}", "--rdzv_backend=c10d",
                      f"--rdzv_endpoint=127.0.0.1:{port}", "tests/cp_worker.py", str(seed), which], timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return [line.split()[1] for line in res.stdout.splitlines() if line.startswith("CASE ")]


def test_every_layer_type_matches_one_rank_on_4_ranks(free_port, fresh_seed):
    cases = run_worker(4, fresh_seed, "quick", free_port)
    kinds = {c.split("/")[0] for c in cases}
    assert kinds == {"full", "swa", "baseconv", "tnl", "based", "rat"}
    assert {c for c in cases if c.startswith("full/")} >= {
        "full/ring/kv2/sink1", "full/ulysses/kv2/sink1", "full/hybrid/kv2/sink1",
        "full/ring-triton-float32/kv2/sink1", "full/ring-triton-bfloat16/kv2/sink1",
        *(f"full/{m}-flash{x}" for m in ("ring", "ulysses", "hybrid") for x in ("", "/lse", "-bf16"))}
    assert {"rat/ring/L3-flash", "rat/ring/L4-flash"} <= set(cases)  # RAT on flash under CP


@pytest.mark.parametrize("n", [2, 4])
def test_packed_documents_under_every_mode_match_one_rank(n, free_port, fresh_seed):
    # every op on two rows packed as one sequence: boundaries on and one token off a rank boundary, 1-token and
    # tiny documents, a document straddling ranks and one over every rank, then random boundaries; RAT chunks of 3
    # straddle the ranks
    cases = run_worker(n, fresh_seed, "documents", free_port)
    ops = {"full-auto", "full-flash", "swa-W3", "swa-W19", "baseconv-K7", "tnl", "based", "rat-L3", "rat-L4",
           "rat-L3-flash"}
    modes = {"ring", "ulysses"} | ({"hybrid"} if n == 4 else set())
    assert set(cases) == {f"docs-{b}/{m}/{op}" for b in ("fixed", "random") for m in modes for op in ops}


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_cp_sweep(n, free_port, fresh_seed):
    cases = run_worker(n, fresh_seed, "sweep", free_port)
    assert len(cases) >= (24 if n == 2 else 34)


COMMON = ["train.steps=2", "logging.interval=1", "logging.progress=false", "checkpoint.interval=0",
          "train.batch_size=4", "logging.sink_interval=1", "logging.layer_interval=1"]


def first_step(run_dir):
    """Everything logged at step 1: train/*, and the sink, state and gradient-norm monitors."""
    merged = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["step"] == 1:
            merged.update(row)
    return merged


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one")
    res = run_module(["-m", "hylo.trainer.train", "--config", "configs/hybrid_tiny.yaml", f"run.dir={run_dir}",
                      *COMMON])
    assert res.returncode == 0, res.stderr[-3000:]
    return first_step(run_dir)


@pytest.mark.parametrize("extra", [pytest.param(["parallel.cp=4", "train.activation_checkpointing=full"],
                                                marks=pytest.mark.slow),  # ring: ops test above
                                   # the chunked loss over each rank's own tokens vs full logits on one rank, and
                                   # selective checkpointing (caching the ops' collectives) with tiled MLPs
                                   ["parallel.cp=2", "parallel.cp_mode=ulysses", "train.loss_chunk=24",
                                    "train.activation_checkpointing=selective", "model.mlp_tile=24"]],
                         ids=["cp4-ring-full-ac", "dp2-cp2-ulysses-chunked-loss-selective-ac-tiled-mlp"])
def test_hybrid_model_under_cp_matches_one_rank(one_rank, tmp_path, free_port, extra):
    res = run_module(["-m", "torch.distributed.run", "--nproc_per_node=4", "--rdzv_backend=c10d",
                      f"--rdzv_endpoint=127.0.0.1:{free_port}", "-m", "hylo.trainer.train", "--config",
                      "configs/hybrid_tiny.yaml", f"run.dir={tmp_path}", *COMMON, *extra])
    assert res.returncode == 0, res.stderr[-5000:]
    many = first_step(tmp_path)
    assert many["train/loss"] == pytest.approx(one_rank["train/loss"], rel=1e-5)
    assert many["train/grad_norm"] == pytest.approx(one_rank["train/grad_norm"], rel=1e-5)
    monitored = [tag for tag in one_rank if tag.startswith(("sinks/", "states/", "grads/"))
                 and "position" not in tag]  # a position is an argmax: ties may order differently
    assert {"sinks/layer5/sink_mass/head0", "sinks/layer2/secondary_top_mass/head3", "states/layer1/norm",
            "states/layer3/max_head", "grads/layer0"} <= set(monitored)
    if extra[0] == "parallel.cp=4":  # the same sequences as one rank: the monitors see the whole of each
        for tag in monitored:
            assert many[tag] == pytest.approx(one_rank[tag], rel=1e-4, abs=1e-6), tag
    else:  # rank 0's data-parallel share: the monitors run and report the same tags
        assert set(monitored) <= set(many)


@pytest.fixture(scope="module")
def one_rank_masked(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one-masked")
    res = run_module(["-m", "hylo.trainer.train", "--config", "configs/hybrid_tiny.yaml", f"run.dir={run_dir}", *COMMON,
                      "data.document_masking=true", "model.document_positions=true"])
    assert res.returncode == 0, res.stderr[-3000:]
    return first_step(run_dir)


@pytest.mark.parametrize("n, extra", [(2, ["parallel.cp=2"]),
                                      pytest.param(4, ["parallel.cp=4", "parallel.cp_mode=hybrid",
                                                       "parallel.ulysses=2"], marks=pytest.mark.slow)],
                         ids=["cp2-ring", "cp4-hybrid"])
def test_document_masking_under_cp_matches_one_rank(one_rank_masked, tmp_path, free_port, n, extra):
    # the hybrid preset (every layer type) with packed documents and per-document positions: the first step's
    # loss, gradient norm and every monitor equal one rank's
    res = run_module(["-m", "torch.distributed.run", f"--nproc_per_node={n}", "--rdzv_backend=c10d",
                      f"--rdzv_endpoint=127.0.0.1:{free_port}", "-m", "hylo.trainer.train", "--config",
                      "configs/hybrid_tiny.yaml", f"run.dir={tmp_path}", *COMMON, "data.document_masking=true",
                      "model.document_positions=true", *extra])
    assert res.returncode == 0, res.stderr[-5000:]
    many = first_step(tmp_path)
    assert many["train/loss"] == pytest.approx(one_rank_masked["train/loss"], rel=1e-5)
    assert many["train/grad_norm"] == pytest.approx(one_rank_masked["train/grad_norm"], rel=1e-5)
    monitored = [tag for tag in one_rank_masked if tag.startswith(("sinks/", "states/", "grads/"))
                 and "position" not in tag]
    assert len(monitored) > 20
    for tag in monitored:
        assert many[tag] == pytest.approx(one_rank_masked[tag], rel=1e-4, abs=1e-6), tag


def test_layouts():
    assert cp_segments(16, 2, "ulysses") == [[(0, 8)], [(8, 8)]]
    assert cp_segments(16, 2, "ring") == [[(0, 4), (12, 4)], [(4, 4), (8, 4)]]
    # hybrid: 2 ring slots x 2 Ulysses ranks; each ring slot's zigzag chunks split over its Ulysses ranks
    assert cp_segments(16, 4, "hybrid", 2) == [[(0, 2), (12, 2)], [(2, 2), (14, 2)], [(4, 2), (8, 2)],
                                               [(6, 2), (10, 2)]]
    for mode, u in [("ring", 1), ("ulysses", 1), ("hybrid", 2)]:
        covered = sorted(p for segs in cp_segments(64, 4, mode, u) for s, n in segs for p in range(s, s + n))
        assert covered == list(range(64))


@pytest.mark.parametrize("overrides, world, fragment", [
    (["parallel.cp=3"], 4, "parallel.cp=3 must divide the number of ranks (4)"),
    (["parallel.cp=4", "train.seq_len=100"], 4, "train.seq_len=100 is not divisible by 2 x parallel.cp = 8"),
    (["parallel.cp=4", "parallel.cp_mode=ulysses", "model.n_heads=6", "model.d_model=96", "model.pattern=[full]"],
     4, "needs model.n_heads=6 divisible by 4"),
    (["parallel.cp=4", "parallel.cp_mode=hybrid", "parallel.ulysses=3"], 4, "parallel.ulysses=3 must divide"),
    (["parallel.cp=2", "model.attn.pinned=4"], 2, "model.attn.pinned is not supported with context parallelism"),
])
def test_bad_cp_settings_fail_clearly(overrides, world, fragment):
    assert fragment in run_problem(load_config(None, overrides), world)


def test_rat_chunks_may_straddle_ranks():
    # (the ops test runs chunks of 3 over 4-token segments; here the config no longer refuses it)
    assert run_problem(load_config(None, ["parallel.cp=4", "model.pattern=[rat]", "model.rat.chunk_size=32"]), 4) \
        is None


def test_bad_cp_setting_stops_the_launch(tmp_path, free_port):
    res = run_module(["-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
                      f"--rdzv_endpoint=127.0.0.1:{free_port}", "-m", "hylo.trainer.train", f"run.dir={tmp_path}",
                      "parallel.cp=2", "train.seq_len=126", *COMMON])
    assert res.returncode != 0 and "train.seq_len=126 is not divisible by 2 x parallel.cp = 4" in res.stderr
    assert res.stderr.count("[hylo] error:") == 1  # rank 0 alone says it; rank 1 exits quietly with the same code
