"""The shape the code promises (README, Architecture): no import cycles, engines judged by what they declare,
one mixer contract that every layer type fulfils, and the trainer's counters in its state_dict."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from hylo.models.lm import MIXERS
from hylo.models.mixer import Mixer
from hylo.trainer.config import load_config
from hylo.trainer.engines import ENGINES, Engine, capability_problem
from tests.conftest import ROOT

PACKAGES = ("trainer", "models", "kernels", "parallel", "launch")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotations only, never executed)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports when run, at the top or inside functions (hidden imports count
    too; `if TYPE_CHECKING:` imports do not)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
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


def test_no_import_cycles_in_the_packages():
    graph = import_graph()
    assert len(graph) > 60  # the walk saw the packages
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
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


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
    for method in ("forward", "prefill", "step", "context_parallel_op"):
        assert getattr(cls, method) is not getattr(Mixer, method), f"{name} does not implement {method}"
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
