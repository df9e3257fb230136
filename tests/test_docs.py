"""README.md is the front door (short, linking topic pages in docs/), every relative link in it and in docs/
resolves, and every `hylo ...` command line they quote still parses: the command's own parser, and for training
commands the config they name with their overrides (keys, types and values validated; nothing runs)."""

import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def code_lines(page: Path):
    """(line number, text) of every line inside a fenced code block."""
    inside = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            inside = not inside
        elif inside:
            yield number, line


def hylo_commands(page: Path):
    for number, line in code_lines(page):
        text = line.strip().removeprefix("$ ")
        if text.startswith(("hylo ", "python -m hylo.trainer.train")):
            text = text.split("  #")[0].split(" # ")[0]  # a trailing comment
            # [optional] parts, nested once (a list value, key=[a,b], stays)
            text = re.sub(r"(?<!=)\[[^\[\]]*(\[[^\[\]]*\])?[^\[\]]*\]", " ", text)
            yield number, text.replace("python -m hylo.trainer.train", "hylo train")


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    for topic in ("training", "configuration", "layers-and-ops", "context-parallelism", "data", "checkpoints",
                  "memory", "monitoring-and-evals", "benchmarks", "architecture"):
        assert f"(docs/{topic}.md)" in readme, f"README does not link docs/{topic}.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link to {target} points nowhere"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: no heading #{anchor} in {resolved.name}"


def check_command(text: str) -> None:
    from hylo.trainer.arguments import parse
    from hylo.trainer.config import load_config

    words = shlex.split(text)[1:]
    command, args = words[0], words[1:]
    parsed = parse(command, args)
    if command in ("train", "plan"):
        load_config(parsed.config, parsed.overrides)
    if command == "launch" and parsed.train_args:
        check_command("hylo train " + shlex.join(parsed.train_args))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_quoted_command_still_parses(page):
    checked = 0
    for number, text in hylo_commands(page):
        try:
            check_command(text)
        except SystemExit as err:
            raise AssertionError(f"{page.name}:{number}: `{text}` does not parse (exit {err.code})") from None
        except Exception as err:  # noqa: BLE001 - a config error names the key
            raise AssertionError(f"{page.name}:{number}: `{text}`: {err}") from None
        checked += 1
    if page.name == "README.md":
        assert checked >= 8


def python_snippets():
    for page in PAGES:
        for number, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            yield pytest.param(page, block, id=f"{page.name}-{number}")


@pytest.mark.parametrize(("page", "code"), list(python_snippets()))
def test_every_python_snippet_runs(page, code, tmp_path, monkeypatch):
    """Each ```python block of the docs runs as written (no tensor left undefined); one that reads a trained run
    (`runs/tiny`) gets a two-step one in its working directory."""
    from tests.conftest import run_module

    monkeypatch.chdir(tmp_path)
    if "runs/tiny" in code:
        res = run_module(["-m", "hylo.trainer.train", "train.steps=2", "model.d_model=32", "model.n_layers=2",
                          "train.seq_len=32", "train.batch_size=2", "logging.progress=false"], cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
    if "exported/hybrid" in code:  # (the Hugging Face page's folder: one of the run above, exported)
        res = run_module(["-m", "hylo.trainer.train", "run.dir=runs/hybrid", "train.steps=2", "model.d_model=32",
                          "model.n_layers=2", "train.seq_len=32", "train.batch_size=2", "logging.progress=false"],
                         cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        res = run_module(["-m", "hylo.trainer.cli", "export", "--checkpoint", "runs/hybrid", "--format", "hf",
                          "--out", "exported/hybrid"], cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
    exec(compile(code, str(page), "exec"), {"__name__": "snippet"})  # noqa: S102 - our own documentation
