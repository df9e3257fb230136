"""hylo installs as `hylo.*` and lives beside the packages its users have: Hugging Face's `kernels` (which
transformers 5 brings), PyPI's `trainer`, anything named `models`, `parallel` or `launch`.

- every folder holding Python files is an installed package (pyproject.toml lists it);
- the five top-level folders shadow nothing, even with the repository root first on sys.path (pytest's rootdir,
  `python -m` / `torchrun -m` from the checkout): a bare `import kernels` finds the other package;
- transformers and hylo's model load in one process, from the checkout and from elsewhere;
- a wheel built from the repository (not editable) trains, plans and launches from any folder, with its configs
  and tokenizer inside it;
- a checkpoint written before the move loads to the same logits and resumes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import tomllib
import torch

from tests.conftest import ROOT, run_module, subprocess_env

TOPS = ("trainer", "models", "kernels", "parallel", "launch")
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "train.seq_len=32", "train.batch_size=2",
        "logging.progress=false", "logging.sink_interval=0"]


def test_every_python_folder_is_an_installed_package():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for top in TOPS:
        assert setuptools["package-dir"][f"hylo.{top}"] == top
        assert not (ROOT / top / "__init__.py").exists(), f"{top}/__init__.py would shadow other '{top}' packages"
    folders = {p.parent for top in TOPS for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts}
    wanted = {".".join(("hylo", *folder.relative_to(ROOT).parts)) for folder in folders}
    missing = sorted(wanted - set(setuptools["packages"]))
    assert not missing, f"folders with Python files missing from pyproject.toml's packages: {missing}"
    assert setuptools["package-dir"]["hylo.configs"] == "configs" and "hylo.configs" in setuptools["packages"]


def fake_packages(where: Path) -> Path:
    """Top-level packages named like hylo's folders, each saying it is the fake."""
    for name in TOPS:
        (where / name).mkdir(parents=True)
        (where / name / "__init__.py").write_text(f"WHO = 'fake {name}'\n")
    return where


BARE_NAMES_ARE_THE_FAKES = """
import importlib
for name in {tops!r}:
    module = importlib.import_module(name)
    assert getattr(module, "WHO", None) == "fake " + name, (name, getattr(module, "__path__", module))
"""


def test_bare_names_find_other_packages_with_the_checkout_first_on_the_path(tmp_path):
    fakes = fake_packages(tmp_path / "fakes")
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{fakes}"}  # the repository root first, as pytest/`python -m` put it
    run = tmp_path / "run"
    # torchrun -m / python -m from the checkout: the working directory (the root) heads sys.path
    res = run_module(["-m", "hylo.trainer.train", f"run.dir={run}", "train.steps=3", "checkpoint.interval=3",
                      *TINY], env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "checkpoints" / "step_3" / "COMPLETE").exists()
    script = BARE_NAMES_ARE_THE_FAKES.format(tops=TOPS) + textwrap.dedent(f"""
        assert sys.path[0] in ("", {str(ROOT)!r})
        from hylo.trainer.cli import main
        assert main(["train", "--dry-run", "run.dir={tmp_path / 'dry'}", *{TINY!r}]) == 0
        assert main(["eval", "--checkpoint", "{run}", "--batches", "1", "--batch-size", "2"]) == 0
        assert main(["generate", "--checkpoint", "{run}", "--prompt", "def f(", "--max-new-tokens", "4"]) == 0
    """) + BARE_NAMES_ARE_THE_FAKES.format(tops=TOPS) + "print('BARE NAMES OK')\n"
    res = run_module(["-c", "import sys\n" + script], env=env)
    assert res.returncode == 0 and "BARE NAMES OK" in res.stdout, res.stderr[-3000:]
    assert "dry run:" in res.stdout and ", ppl " in res.stdout


TRANSFORMERS_BESIDE_HYLO = """
import kernels, transformers
from transformers import AutoModelForCausalLM
assert hasattr(kernels, "get_kernel"), kernels.__file__  # Hugging Face's kernel hub, not hylo's folder
import torch
from hylo.kernels.ops import attention
from hylo.models.lm import HybridLM
from hylo.trainer.config import load_config
cfg = load_config(None, ["model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.vocab_size=64"])
logits = HybridLM(cfg.model)(torch.randint(0, 64, (1, 16)))
assert logits.shape == (1, 16, 64) and torch.isfinite(logits).all()
print("TOGETHER", transformers.__version__, AutoModelForCausalLM.__name__)
"""


def test_transformers_and_hylo_in_one_process(tmp_path):
    import transformers  # the dev extra installs transformers 5 (and with it Hugging Face's `kernels`)

    assert int(transformers.__version__.split(".")[0]) >= 5
    for cwd in (ROOT, tmp_path):  # from the checkout (root first on sys.path) and from another folder
        res = run_module(["-c", TRANSFORMERS_BESIDE_HYLO], cwd=cwd)
        assert res.returncode == 0 and "TOGETHER" in res.stdout, (cwd, res.stderr[-3000:])


def wheel_environment(tmp_path: Path) -> Path:
    """A fresh virtual environment holding hylo from a wheel (not the checkout) and this one's other packages."""
    source = tmp_path / "source"  # a copy: setuptools builds in the tree it is given, and leaves build/ there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in (*TOPS, "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(wheels), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = wheels.glob("hylo-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # torch & co. from this environment: a plain path line, so this environment's editable hylo (a .pth hook) is
    # not loaded there
    Path(purelib, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    return venv


def test_a_wheel_works_from_any_folder(tmp_path):
    venv = wheel_environment(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def hylo(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "hylo"), *args], cwd=elsewhere, env=subprocess_env(),
                              capture_output=True, text=True, timeout=timeout)

    where = subprocess.run([str(venv / "bin" / "python"), "-c", textwrap.dedent("""
        import hylo.trainer.cli, hylo.kernels.ops
        from hylo.trainer.config import CONFIG_DIR
        from hylo.trainer.data.tokenizer import BUNDLED_TOKENIZER, load_tokenizer
        print(hylo.trainer.cli.__file__, CONFIG_DIR, BUNDLED_TOKENIZER, load_tokenizer().get_vocab_size())
    """)], cwd=elsewhere, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-2000:]
    cli, configs, tokenizer, vocab = where.stdout.split()
    for path in (cli, configs, tokenizer):
        assert str(venv) in path and str(ROOT) not in path, where.stdout  # inside the wheel's install
    assert (Path(configs) / "hybrid_tiny.yaml").is_file() and int(vocab) > 1000

    run = elsewhere / "runs" / "wheel"
    res = hylo("train", "--config", "hybrid_tiny", f"run.dir={run}", "train.steps=2", "checkpoint.interval=2",
               "model.d_model=32", "model.n_heads=2", "train.seq_len=64", "train.batch_size=2",
               "logging.progress=false", "logging.sink_interval=0")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "checkpoints" / "step_2" / "COMPLETE").exists()
    plan = hylo("plan", "--config", "hybrid_1b", "train.seq_len=32768", "--gpus", "1", "--gpu-mem", "80")
    assert plan.returncode in (0, 1) and "GiB" in plan.stdout, plan.stderr[-2000:]
    launch = hylo("launch", "--gpus-per-node", "2", "--dry-run", "--", "--config", "hybrid_tiny")
    assert launch.returncode == 0 and "-m hylo.trainer.train --config hybrid_tiny" in launch.stdout, launch.stderr
    assert hylo("--help").returncode == 0


FIXTURE = ROOT / "tests" / "fixtures" / "pre_namespace"


def test_a_checkpoint_written_before_the_move_loads_and_resumes(tmp_path):
    from hylo.trainer.checkpointing.export import load_trained_model

    model, cfg = load_trained_model(FIXTURE / "step_3")
    assert list(cfg.model.pattern) == ["rat", "tnl", "swa", "based", "baseconv", "full"]
    expected = torch.load(FIXTURE / "expected_logits.pt")
    with torch.no_grad():
        logits = model(expected["tokens"])
    torch.testing.assert_close(logits.float(), expected["logits"], rtol=1e-5, atol=1e-5)
    # the step folder stores no module path: nothing in it names trainer./models./kernels. modules
    for name in ("trainer_state.json", "MANIFEST.json"):
        text = (FIXTURE / "step_3" / name).read_text()
        assert "hylo." not in text and "trainer." not in text and "models." not in text
    res = run_module(["-m", "hylo.trainer.train", "--resume", str(FIXTURE / "step_3"), f"run.dir={tmp_path}",
                      "train.steps=5", "checkpoint.interval=5"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "step_5" / "COMPLETE").exists()
    assert not (FIXTURE / "step_3").with_name("step_5").exists()  # the fixture itself is left as it was


def test_no_file_names_a_bare_module_in_a_command_line():
    """`python -m trainer.train` / `torchrun -m trainer.train` would run whatever `trainer` the path finds first."""
    offenders = []
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "launch").glob("*.sh"),
                 ROOT / "launch" / "slurm.sbatch"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for word in (" -m ", "--module "):
                if word in line and line.split(word, 1)[1].split(".")[0] in TOPS:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["hylo"]
    assert entry == "hylo.trainer.cli:main"
