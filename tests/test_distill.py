"""Distillation (train.objective=align|distill): the chunked KL against its full-logits oracle, identity students,
alignment of every mixer type, the trainer end to end (logging, resume, refusals) and the multi-rank layouts."""

from __future__ import annotations

import json
import weakref

import pytest
import torch

from hylo.models.lm import HybridLM
from hylo.models.loss import IGNORE_INDEX, distillation_loss, full_distillation_loss
from hylo.trainer.checkpointing.transfer import transfer
from hylo.trainer.config import ModelConfig, load_config
from hylo.trainer.data.loader import inputs_and_targets
from hylo.trainer.distillation.objectives import AlignObjective, DistillObjective
from hylo.trainer.distillation.teacher import Teacher
from hylo.trainer.engines.base import MicroBatch
from hylo.trainer.errors import ConfigError
from tests.conftest import ROOT, run_module

F64 = torch.float64
VOCAB = 96


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------ the chunked KL
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_kl_equals_the_full_logits_kl_and_its_gradient(fresh_seed, temperature):
    """fp64, 1e-10: values and gradients; widths differ between the models, some targets are not scored, and the
    chunk does not divide the tokens."""
    g = torch.Generator().manual_seed(fresh_seed)
    hidden = torch.randn(3, 17, 12, dtype=F64, generator=g).requires_grad_()
    weight = (torch.randn(40, 12, dtype=F64, generator=g) * 0.5).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(3, 17, 10, dtype=F64, generator=g), torch.randn(40, 10, dtype=F64)
    targets = torch.randint(0, 40, (3, 17), generator=g)
    targets[0, :5] = IGNORE_INDEX
    kl, ce = distillation_loss(hidden, weight, teacher_hidden, teacher_weight, targets, temperature, chunk=7)
    full_kl, full_ce = full_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, targets, temperature)
    assert rel(kl, full_kl) < 1e-10 and rel(ce, full_ce) < 1e-10
    assert kl.item() > 0
    for a, b in ((0.7, 0.3), (1.0, 0.0), (0.0, 1.0)):  # each term's gradient alone and together
        ours = torch.autograd.grad(a * kl + b * ce, (hidden, weight), retain_graph=True)
        theirs = torch.autograd.grad(a * full_kl + b * full_ce, (hidden, weight), retain_graph=True)
        for x, y in zip(ours, theirs, strict=True):
            assert rel(x, y) < 1e-10


def test_chunked_kl_refuses_another_vocabulary():
    with pytest.raises(ValueError, match="vocabulary"):
        distillation_loss(torch.randn(4, 8), torch.randn(10, 8), torch.randn(4, 8), torch.randn(12, 8),
                          torch.zeros(4, dtype=torch.long))


class PeakTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The peak of the bytes held by tensors that ops create inside the context (freed ones subtracted as their
    storages die): the allocator's view of a computation, measured on the meta device without allocating."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.seen:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def test_chunked_kl_peak_memory_is_at_most_half_the_full_versions():
    """At T = 16K tokens and a 32K vocabulary, forward and backward, in float32 with train.loss_chunk's default
    4096: the chunked KL's tensors peak at <= 0.5x the full-logits version's (measured on the meta device)."""
    tokens, vocab, width = 16384, 32768, 64

    def peak(fn) -> int:
        hidden = torch.randn(tokens, width, device="meta", requires_grad=True)
        weight = torch.randn(vocab, width, device="meta", requires_grad=True)
        teacher_hidden, teacher_weight = torch.randn(tokens, width, device="meta"), torch.randn(vocab, width,
                                                                                               device="meta")
        targets = torch.zeros(tokens, dtype=torch.long, device="meta")
        with PeakTensorBytes() as mode:
            kl, ce = fn(hidden, weight, teacher_hidden, teacher_weight, targets)
            (kl + 0.5 * ce).backward()
        return mode.peak

    chunked = peak(lambda *a: distillation_loss(*a, temperature=2.0, chunk=4096))
    full = peak(lambda *a: full_distillation_loss(*a, temperature=2.0))
    logits = tokens * vocab * 4
    assert full >= 2 * logits  # the reference really holds both models' logits
    assert chunked <= 0.5 * full, (chunked / 2**30, full / 2**30)


# ---------------------------------------------------------------------------------------------- models
def tiny_cfg(pattern: list[str], **changes) -> ModelConfig:
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=2, pattern=pattern, window=8)
    cfg.rat.chunk_size = 4
    cfg.attn.sink = False
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def build_pair(seed: int, student_pattern=("rat", "based", "tnl", "swa"), teacher_pattern=("full",),
               std: float = 0.02) -> tuple[Teacher, HybridLM]:
    """A float64 teacher (dense unless told) and a student of `student_pattern` started from it."""
    torch.manual_seed(seed)
    teacher_model = HybridLM(tiny_cfg(list(teacher_pattern), init_std=std)).to(F64)
    teacher_model.requires_grad_(False)
    student = HybridLM(tiny_cfg(list(student_pattern), init_std=std)).to(F64)
    transfer(teacher_model, student, "the teacher")
    identity = {"path": "memory", "fingerprint": "0", "vocab_size": VOCAB, "d_model": 32, "layers": []}
    return Teacher(teacher_model, ROOT, identity), student


def make_objective(kind: str, teacher: Teacher, student: HybridLM, layers: list[int] | None = None,
                   temperature: float = 2.0, lm_weight: float = 0.3):
    if kind == "distill":
        return DistillObjective(teacher, temperature, lm_weight, loss_chunk=16)
    layers = list(range(len(student.blocks))) if layers is None else layers
    student.requires_grad_(False)
    for i in layers:
        student.blocks[i].mixer.requires_grad_(True)
    return AlignObjective(teacher, layers)


def micro_batch(seed: int, rows: int = 2, seq_len: int = 32) -> MicroBatch:
    g = torch.Generator().manual_seed(seed)
    return MicroBatch(*inputs_and_targets(torch.randint(0, VOCAB, (rows, seq_len + 1), generator=g)), None, None)


@pytest.mark.parametrize("pattern", [("full",), ("full", "swa"), ("rat", "based", "tnl", "full")],
                         ids=["dense", "dense-window", "hybrid"])
def test_a_student_identical_to_its_teacher_has_zero_kl_align_loss_and_gradients(fresh_seed, pattern):
    """fp64, 1e-10: same pattern, weights taken from the teacher (transfer copies every block whole)."""
    teacher, student = build_pair(fresh_seed, pattern, pattern)
    micro = micro_batch(fresh_seed)
    distill = make_objective("distill", teacher, student, lm_weight=0.0)
    loss = distill(student, micro)
    loss.backward()
    terms = distill.scalars()
    assert abs(terms["distill/kl"].item()) < 1e-10 and abs(loss.item()) < 1e-10
    assert terms["distill/lm"].item() > 1.0  # the student's own cross-entropy is a real number, not zero
    for name, p in student.named_parameters():
        assert p.grad is not None and p.grad.abs().max().item() < 1e-10, name
    align = make_objective("align", teacher, student)
    loss = align(student, micro)
    terms = align.scalars()
    assert sorted(terms) == [f"distill/align/{i}" for i in range(4)]
    assert all(abs(v.item()) < 1e-10 for v in terms.values()) and abs(loss.item()) < 1e-10


def test_packed_documents_reach_the_teacher_too(fresh_seed):
    """With data.document_masking the teacher sees the same boundaries as the student: an identical student still
    has KL 0 on packed documents (fp64), and the KL differs from the unmasked one (the boundaries matter)."""
    teacher, student = build_pair(fresh_seed, ("rat", "based", "tnl", "full"), ("rat", "based", "tnl", "full"))
    flat = micro_batch(fresh_seed, rows=1, seq_len=64)
    packed = MicroBatch(flat.inputs, flat.targets, None, torch.tensor([0, 21, 40, 64], dtype=torch.int32))
    distill = make_objective("distill", teacher, student, lm_weight=0.0)
    assert abs(distill(student, packed).item()) < 1e-10
    other, _ = build_pair(fresh_seed + 1, ("rat", "based", "tnl", "full"), ("rat", "based", "tnl", "full"))
    distill = make_objective("distill", other, student, lm_weight=0.0)
    assert abs(distill(student, packed).item() - distill(student, flat).item()) > 1e-6


def test_align_trains_only_the_aligned_mixers_on_the_teachers_hidden_states(fresh_seed):
    teacher, student = build_pair(fresh_seed, ("full", "rat", "full", "tnl"))
    align = make_objective("align", teacher, student, layers=[1, 3])
    loss = align(student, micro_batch(fresh_seed))
    loss.backward()
    trained = {n for n, p in student.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith(("blocks.1.mixer.", "blocks.3.mixer.")) for n in trained)
    terms = align.scalars()
    assert sorted(terms) == ["distill/align/1", "distill/align/3"]
    assert loss.item() == pytest.approx((terms["distill/align/1"] + terms["distill/align/3"]).item() / 2, rel=1e-12)
    # the target really is the teacher's own layer: block 3's input is the teacher's residual stream at block 3
    seen = {}
    teacher.model.blocks[3].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    teacher.model(micro_batch(fresh_seed).inputs)
    mine = student(micro_batch(fresh_seed).inputs, mixer_inputs={3: seen["x"]})[3]
    expected = teacher.model.blocks[3].mixer(teacher.model.blocks[3].mixer_norm(seen["x"]),
                                             torch.arange(32))
    assert terms["distill/align/3"].item() == pytest.approx(((mine - expected) ** 2).mean().item(), rel=1e-9)


TEACHER_RUN = ["train.steps=200", "logging.interval=50", "logging.progress=false", "train.batch_size=8",
               "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "train.seq_len=64",
               "checkpoint.interval=200", "model.pattern=[full]", "model.attn.sink=false", "eval.interval=0",
               "train.lr=3e-3"]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A dense 2-layer teacher trained by hylo for 200 steps on the bundled corpus (~10 s): its run dir."""
    from hylo.trainer.train import train

    run_dir = tmp_path_factory.mktemp("teacher")
    train(load_config(None, [f"run.dir={run_dir}", *TEACHER_RUN]))
    return run_dir


def corpus_batches(n: int, seq_len: int = 64, rows: int = 8) -> list[torch.Tensor]:
    from hylo.trainer.data.loader import DataLoader
    from hylo.trainer.data.tokenizer import load_tokenizer

    cfg = load_config(None, [f"train.seq_len={seq_len}"])
    loader = DataLoader(cfg.data, load_tokenizer(cfg.data.tokenizer), seq_len=seq_len, global_batch=rows,
                        micro_batch=rows, rank=0, world=1, seed=0)
    try:
        return [next(loader)[0] for _ in range(n)]
    finally:
        loader.close()


@pytest.mark.parametrize("kind", ["rat", "based", "tnl", "swa"])
def test_align_loss_falls_tenfold_for_every_mixer_type(tiny_teacher, kind):
    """A tiny trained teacher; block 0 becomes `kind` with a fresh mixer (the rest from the teacher) and is aligned
    on the bundled corpus: its loss (the mean of the last 5 steps) ends at most a tenth of its first step's."""
    from hylo.trainer.checkpointing.transfer import load_source_model

    teacher_model, teacher_cfg = load_source_model(tiny_teacher, "teacher")
    teacher_model.requires_grad_(False)
    cfg = ModelConfig(**{**teacher_cfg.__dict__, "pattern": [kind, "full"], "window": 16})
    cfg.rat.chunk_size = 8
    torch.manual_seed(0)
    student = HybridLM(cfg)
    fresh = {k: v.clone() for k, v in student.blocks[0].mixer.state_dict().items()}
    transfer(teacher_model, student, "the teacher")
    student.blocks[0].mixer.load_state_dict(fresh)
    align = make_objective("align", Teacher(teacher_model, tiny_teacher, {}), student, layers=[0])
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for batch in corpus_batches(40) * 5:
        loss = align(student, MicroBatch(*inputs_and_targets(batch), None, None))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 <= losses[0] / 10, (kind, losses[0], losses[-5:])


# ------------------------------------------------------------------------------------------ the trainer
STUDENT = ["train.steps=6", "logging.interval=1", "logging.progress=false", "train.batch_size=4", "train.seq_len=64",
           "checkpoint.interval=2", "eval.interval=0", "model.pattern=[rat,full]", "model.rat.chunk_size=8",
           "model.attn.sink=false", "train.lr=1e-3"]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_align_then_distill_end_to_end(tiny_teacher, tmp_path, capsys):
    """Stage 1 aligns block 0's new RAT mixer (nothing else moves), stage 2 distills the whole student from it; each
    logs its terms (metrics file and TensorBoard), and the loss is what the terms say."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hylo.trainer.checkpointing.export import load_trained_model
    from hylo.trainer.train import train

    align_dir, distill_dir = tmp_path / "align", tmp_path / "distill"
    train(load_config(None, [f"run.dir={align_dir}", *STUDENT, "train.objective=align",
                             f"distill.teacher={tiny_teacher}", f"model.init_from={tiny_teacher}"]))
    out = capsys.readouterr().out
    assert "train.objective=align: align blocks [0]" in out and "1 block(s) copied whole, 1 replaced (0: full -> rat)" \
        in out
    rows = metrics(align_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for row in rows:
        assert row["train/loss"] == pytest.approx(row["distill/align/0"], rel=1e-6)
    assert all(row["distill/align/0"] > 0 for row in rows)
    teacher, _ = load_trained_model(tiny_teacher)
    aligned, _ = load_trained_model(align_dir)
    theirs = teacher.state_dict()
    for name, tensor in aligned.state_dict().items():  # only block 0's mixer trained
        if name.startswith("blocks.0.mixer."):
            continue
        assert torch.equal(tensor, theirs[name]), name

    train(load_config(None, [f"run.dir={distill_dir}", *STUDENT, "train.objective=distill",
                             f"distill.teacher={tiny_teacher}", f"model.init_from={align_dir}",
                             "distill.temperature=2", "distill.lm_weight=0.5"]))
    rows = metrics(distill_dir)
    for row in rows:
        assert row["train/loss"] == pytest.approx(4 * row["distill/kl"] + 0.5 * row["distill/lm"], rel=1e-5)
    events = EventAccumulator(str(distill_dir / "tb"))
    events.Reload()
    for tag in ("distill/kl", "distill/lm", "train/loss"):
        assert [e.step for e in events.Scalars(tag)] == list(range(1, 7)), tag


def test_a_killed_distillation_resumes_bit_exactly(tiny_teacher, tmp_path):
    """Killed (SIGKILL) at step 5 after the step-4 checkpoint and resumed: every logged term of every step equals
    the uninterrupted run's, bit for bit; the checkpoint records the teacher."""
    from hylo.trainer.checkpointing import read_trainer_state
    from hylo.trainer.train import train

    args = [*STUDENT, "train.objective=distill", f"distill.teacher={tiny_teacher}", f"model.init_from={tiny_teacher}",
            "distill.lm_weight=0.5", "train.cpu_threads=1"]
    train(load_config(None, [f"run.dir={tmp_path / 'straight'}", *args]))
    killed = run_module(["-m", "tests.fault_run", f"run.dir={tmp_path / 'killed'}", *args],
                        env={"HYLO_FAULT": "kill:5"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    train(load_config(None, [f"run.dir={tmp_path / 'killed'}", *args]))
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "killed")
    keys = ("train/loss", "distill/kl", "distill/lm", "train/grad_norm")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    identity = read_trainer_state(tmp_path / "killed" / "checkpoints" / "step_6")["distill_teacher"]
    assert identity["path"].endswith("step_200") and len(identity["fingerprint"]) == 32
    # the teacher was given as a run dir: the config records the step it resolved to, so a resume reads that one
    assert load_config(tmp_path / "killed" / "config.yaml").distill.teacher.endswith("step_200")


def test_resume_refuses_another_teacher_and_another_objective(tiny_teacher, tmp_path, capsys):
    from hylo.trainer.checkpointing.export import load_trained_model, write_weights
    from hylo.trainer.train import train

    run_dir = tmp_path / "run"
    args = [f"run.dir={run_dir}", *STUDENT, "train.objective=distill", f"model.init_from={tiny_teacher}"]
    train(load_config(None, [*args, f"distill.teacher={tiny_teacher}", "train.steps=2"]))
    model, cfg = load_trained_model(tiny_teacher)
    same = write_weights(model, cfg.model, tmp_path / "same.safetensors", "fp32")
    with torch.no_grad():
        model.blocks[1].mlp.down.weight[0, 0] += 1e-3
    other = write_weights(model, cfg.model, tmp_path / "other.safetensors", "fp32")
    with pytest.raises(ConfigError, match=r"was distilled from the teacher .*step_200.*other weights"):
        train(load_config(None, [*args, f"distill.teacher={other}", "train.steps=4"]))
    with pytest.raises(ConfigError, match=r"another objective \(train.objective 'distill' -> 'align'"):
        train(load_config(None, [*args, f"distill.teacher={tiny_teacher}", "train.objective=align",
                                 "train.steps=4"]))
    capsys.readouterr()
    train(load_config(None, [*args, f"distill.teacher={same}", "train.steps=4"]))  # the same weights, moved
    assert "the teacher's weights come from another place now" in capsys.readouterr().out
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]


@pytest.mark.parametrize("change, message", [
    (["train.objective=distill", "model.vocab_size=9024"], "predicts over 4096 tokens, this student over 9024"),
    (["train.objective=align", "model.d_model=32", "model.n_layers=2"], "both need the same depth and width"),
    (["train.objective=align", "model.pattern=[full]", "model.init_from=TEACHER"], "no mixer is new"),
    (["train.objective=align", "model.d_model=64", "model.n_layers=2", "model.n_heads=4"],
     "start the student from it with model.init_from="),
    (["train.objective=align", "model.init_from=TEACHER", "distill.align_layers=[2]"], "blocks are 0 to 1"),
    (["train.objective=distill"], "does not exist"),
], ids=["vocabulary", "width", "nothing-to-align", "align-from-nothing", "align-layers", "missing"])
def test_a_teacher_that_does_not_fit_is_refused_in_one_line_before_any_step(tiny_teacher, tmp_path, change, message):
    teacher = tmp_path / "nowhere" if message == "does not exist" else tiny_teacher
    run_dir = tmp_path / "run"
    change = [item.replace("TEACHER", str(tiny_teacher)) for item in change]
    res = run_module(["-m", "hylo.trainer.train", f"run.dir={run_dir}", *STUDENT, f"distill.teacher={teacher}",
                      *change])
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and message in errors[0], res.stderr[-2000:]
    assert not run_dir.exists() and "step 1" not in res.stdout


def test_the_memory_plan_counts_the_teacher(tiny_teacher):
    from hylo.trainer.memory_plan import plan_memory

    base = [*STUDENT, "model.vocab_size=8192", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
            "train.activation_checkpointing=none"]
    plain = plan_memory(load_config(None, base), 1, 16.0, "cpu")
    distill = plan_memory(load_config(None, [*base, "train.objective=distill", f"distill.teacher={tiny_teacher}"]),
                          1, 16.0, "cpu")
    lines = {name: b for name, b, _ in distill.lines}
    n_params = sum(p.numel() for p in HybridLM(_teacher_cfg(tiny_teacher)).parameters())
    assert lines["teacher weights"] == 4 * n_params  # fp32 on the CPU, whole
    assert lines["teacher activations"] > 0 and distill.total > plain.total


def _teacher_cfg(run_dir):
    from hylo.trainer.checkpointing.export import load_trained_model

    return load_trained_model(run_dir)[1].model


def test_a_hugging_face_teacher_and_a_student_imported_from_it_agree(tmp_path):
    """A Llama teacher straight from its HF folder; a dense student imported from the same folder (no sinks) has
    KL 0 (fp64, 1e-10); a hybrid student imported from it does not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hylo.trainer.checkpointing.hf_import import apply_shape, import_into, read_hf_config
    from hylo.trainer.distillation.teacher import load_teacher

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    teacher = load_teacher(str(tmp_path))
    teacher.model.to(F64)
    micro = micro_batch(1)
    for pattern, expect_zero in ((["full"], True), (["tnl", "full"], False)):
        cfg = load_config(None, [f"model.pattern={pattern}".replace("'", ""), "model.attn.sink=false"]).model
        apply_shape(cfg, read_hf_config(tmp_path), given=set())
        student = HybridLM(cfg)
        import_into(student, tmp_path)
        student.to(F64)
        distill = make_objective("distill", teacher, student, lm_weight=0.0)
        kl = distill(student, micro).item()
        assert (abs(kl) < 1e-10) == expect_zero, (pattern, kl)


# ------------------------------------------------------------------------------------------ several ranks
def test_cp_and_fsdp2_layouts_give_the_one_rank_losses_and_gradients(fresh_seed, free_port):
    """fp64 on 2 gloo ranks (tests/distill_worker.py): align and distill under cp=2 ring, cp=2 Ulysses (teacher and
    student both context-parallel) and FSDP2 (both sharded) equal one rank's loss (1e-10) and gradient (1e-9)."""
    res = run_module(["-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
                      f"--rdzv_endpoint=127.0.0.1:{free_port}", "-m", "tests.distill_worker", str(fresh_seed % 10**6)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    cases = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("CASE")]
    assert cases == [f"{o}-{layout}" for o in ("align", "distill") for layout in ("ring", "ulysses", "fsdp2")]


@pytest.mark.parametrize("objective, layout", [
    ("distill", ["parallel.dp_shard=true"]),
    ("align", ["parallel.cp=2", "parallel.cp_mode=ring"]),
    pytest.param("distill", ["parallel.cp=2", "parallel.cp_mode=ulysses"], marks=pytest.mark.slow),
    ("distill", ["train.engine=deepspeed", "deepspeed.zero_stage=3"]),
], ids=["fsdp2-distill", "ring-align", "ulysses-distill", "zero3-distill"])
def test_two_rank_runs_match_one_rank(tiny_teacher, tmp_path, free_port, objective, layout):
    """The trainer end to end on 2 ranks (teacher laid out as the student) against 1 rank: the first step's loss
    and terms (fp32: 1e-5)."""
    args = [*STUDENT, "train.steps=2", f"train.objective={objective}", f"distill.teacher={tiny_teacher}",
            f"model.init_from={tiny_teacher}", "distill.lm_weight=0.5"]
    one = run_module(["-m", "hylo.trainer.train", f"run.dir={tmp_path / 'one'}", *args])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_module(["-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
                      f"--rdzv_endpoint=127.0.0.1:{free_port}", "-m", "hylo.trainer.train",
                      f"run.dir={tmp_path / 'two'}", *args, *layout], env={"DS_ACCELERATOR": "cpu"})
    assert two.returncode == 0, two.stderr[-3000:]
    if any("dp_shard" in x or "zero_stage=3" in x for x in layout):
        assert "blocks sharded" in two.stdout
    first_one, first_two = metrics(tmp_path / "one")[0], metrics(tmp_path / "two")[0]
    for key in [k for k in first_one if k.startswith(("distill/", "train/loss"))]:
        assert first_two[key] == pytest.approx(first_one[key], rel=1e-5), key


def test_the_same_teacher_in_every_format_has_one_fingerprint(tiny_teacher, tmp_path):
    """A checkpoint, its fp32 `.safetensors` export and its fp32 Hugging Face export load as one teacher (same
    fingerprint, same logits); a bf16 export is another teacher (its weights were rounded)."""
    from hylo.trainer.checkpointing.export import export, export_hf
    from hylo.trainer.distillation.teacher import load_teacher

    forms = [tiny_teacher, export(tiny_teacher, tmp_path / "t.safetensors", "fp32"),
             export_hf(tiny_teacher, tmp_path / "hf", "fp32")]
    teachers = [load_teacher(str(form)) for form in forms]
    assert len({t.identity["fingerprint"] for t in teachers}) == 1
    tokens = micro_batch(0).inputs
    logits = [t.model(tokens) for t in teachers]
    assert all(torch.equal(logits[0], other) for other in logits[1:])
    rounded = load_teacher(str(export(tiny_teacher, tmp_path / "bf16.safetensors", "bf16")))
    assert rounded.identity["fingerprint"] != teachers[0].identity["fingerprint"]


def test_a_bf16_teacher_keeps_its_rope_and_decays_in_float32(tiny_teacher):
    """Laid out in bf16, the teacher's weights are bf16 but its non-persistent buffers (RoPE frequencies, decay
    rates) stay float32, so under autocast it computes what the float32 teacher does to bf16 rounding."""
    from hylo.trainer.distillation.teacher import load_teacher, prepare_teacher

    teacher, reference = load_teacher(str(tiny_teacher)), load_teacher(str(tiny_teacher))
    buffers = {name: b.dtype for name, b in teacher.model.named_buffers()}
    prepare_teacher(teacher, torch.device("cpu"), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in teacher.model.parameters())
    assert {name: b.dtype for name, b in teacher.model.named_buffers()} == buffers
    assert any("inv_freq" in name for name in buffers)
    tokens = corpus_batches(1, seq_len=256, rows=2)[0][:, :-1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = teacher.model(tokens).float()
    theirs = reference.model(tokens)
    assert rel(ours, theirs) < 3e-2  # bf16 weights and activations; positions up to 255 are exact


def test_transfer_takes_the_sources_layer_options_and_refuses_a_mismatch_by_name():
    from hylo.trainer.checkpointing.transfer import take_shape

    source = tiny_cfg(["rat", "full"], window=32)
    source.rat.chunk_size, source.attn.sink, source.rat.backend = 8, True, "naive"
    student = ModelConfig(pattern=["rat", "full"])
    take_shape(student, source, "the source")
    assert (student.window, student.rat.chunk_size, student.attn.sink, student.rat.backend) == (32, 8, True, "auto")
    assert (student.d_model, student.vocab_size, student.n_layers) == (32, VOCAB, 4)
    kept = ModelConfig()  # the default pattern: a hylo source's own pattern is taken (an export loads as itself)
    take_shape(kept, source, "the source")
    assert kept.pattern == ["rat", "full"]
    with_sinks = HybridLM(source)
    student.attn.sink = False  # set by the user: kept, and the copy of block 1 (full) cannot take the sinks
    with pytest.raises(ConfigError, match=r"block 1 \(full\) has mixer.sink on one side only"):
        transfer(with_sinks, HybridLM(student), "the source")


def test_a_checkpoint_from_before_distillation_resumes_as_lm_and_refuses_align(tmp_path):
    """A saved config without the new keys had their defaults: lm resumes, align is refused by name."""
    from hylo.trainer.checkpointing.resume import config_record, resume_changes

    cfg = load_config(None, [])
    saved = config_record(cfg)
    del saved["train"]["objective"], saved["distill"]
    assert resume_changes(saved, cfg, "old") == ([], [])
    align = load_config(None, ["train.objective=align", "distill.teacher=x"])
    with pytest.raises(ConfigError, match=r"another objective \(train.objective 'lm' -> 'align'"):
        resume_changes(saved, align, "old")
