"""The shape the code promises (README, Architecture): no import cycles, engines judged by what they declare,
one mixer contract that every layer type fulfils, and the trainer's counters in its state_dict."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from hylo.models.lm import MIXERS
from hylo.models.mixer import Mixer
from hylo.parallel.strategies import STRATEGIES
from hylo.trainer.config import load_config
from hylo.trainer.engines import ENGINES, Engine, capability_problem
from tests.conftest import ROOT

PACKAGES = ("trainer", "models", "kernels", "parallel", "launch")  # folders that install as hylo.<folder>


def module_name(path: Path, root: Path = ROOT) -> str:
    """The name a file imports under: trainer/data/loader.py -> hylo.trainer.data.loader."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(("hylo", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotations only, never executed)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports when run, at the top or inside functions (hidden imports count
    too; `if TYPE_CHECKING:` imports do not)."""
    files = {module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in runtime_nodes(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in files else node.module
                           for alias in node.names]
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return cycles


def test_no_import_cycles_in_the_packages():
    graph = import_graph()
    assert len(graph) > 60  # the walk saw the packages
    assert sum(len(targets) for targets in graph.values()) > 200  # ... and their imports, under the hylo.* names
    cycles = import_cycles(graph)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_a_planted_cycle_is_seen(tmp_path):
    """The walk must not go blind: a copy of the packages with one import planted back up is caught."""
    import shutil

    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert not import_cycles(import_graph(tmp_path))
    rope = tmp_path / "kernels" / "rope.py"  # hylo.models.rope imports it; now it imports hylo.models.rope back
    planted = "\n\ndef _planted():\n    from hylo.models.rope import RotaryEmbedding  # noqa: F401\n"
    rope.write_text(rope.read_text() + planted)
    cycles = import_cycles(import_graph(tmp_path))
    assert any({"hylo.kernels.rope", "hylo.models.rope"} <= set(c) for c in cycles), cycles


def test_no_module_imports_a_bare_top_level_name():
    """Everything imports as hylo.*: a bare `kernels`/`trainer`/... would find Hugging Face's or PyPI's package."""
    bare = []
    for path in [*(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")), *(ROOT / "tests").rglob("*.py"),
                 *(ROOT / "bench").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            bare += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in PACKAGES]
    assert not bare, bare


def test_models_know_nothing_of_parallelism():
    graph = import_graph()
    reaching = {m: sorted(t for t in targets if t.startswith("hylo.parallel."))
                for m, targets in graph.items() if m.startswith("hylo.models.")}
    assert not any(reaching.values()), reaching


def test_engines_are_refused_by_what_they_declare():
    @dataclasses.dataclass
    class Limited(Engine):
        name = "limited"  # declares nothing

    cfg = load_config(None, ["train.nan_policy=skip"])
    assert "train.nan_policy=skip is not supported with train.engine=limited" in capability_problem(Limited, cfg)
    assert capability_problem(ENGINES["torch"], cfg) is None
    cfg = load_config(None, ["checkpoint.async_save=true"])
    assert "checkpoint.async_save is not supported" in capability_problem(Limited, cfg)
    cfg = load_config(None, ["parallel.dp_shard=true"])
    assert "parallel.dp_shard=true (FSDP2) is not supported" in capability_problem(Limited, cfg)
    assert capability_problem(Limited, load_config(None, [])) is None
    assert not ENGINES["deepspeed"].exposes_gradients and ENGINES["torch"].exposes_gradients


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_layer_type_fulfils_the_mixer_contract(name):
    cls = MIXERS[name]
    assert issubclass(cls, Mixer) and cls.layer_type == name
    for method in ("forward", "prefill", "step"):
        assert getattr(cls, method) is not getattr(Mixer, method), f"{name} does not implement {method}"
    assert name in STRATEGIES, f"{name} has no context-parallel strategy in parallel/strategies.py"
    assert cls.attention_flops_per_token.__func__ is not Mixer.attention_flops_per_token.__func__
    assert cls.monitor_group in (None, "sinks", "states")
    if cls.monitor_group is not None:
        assert cls.monitor is not Mixer.monitor


def test_registering_a_non_mixer_is_refused():
    from hylo.models.registry import register_mixer

    with pytest.raises(TypeError, match="must subclass models.mixer.Mixer"):
        register_mixer("not_a_mixer")(torch.nn.Module)
    with pytest.raises(ValueError, match="registered twice"):
        register_mixer("full")(MIXERS["swa"])
