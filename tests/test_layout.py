"""The layers of docs/layout.md, checked from the code's own imports: no import runs from a lower
layer up to a higher one (imports inside functions and ``TYPE_CHECKING`` blocks included), no two
modules import each other in a circle, the feature packages do not lean on one another, and no
module of the library grows past ``MAX_LINES``. A new feature that breaks the rule fails here,
naming the import and the line, instead of slowly tangling the tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450

#: (module prefix, layer); the longest matching prefix decides. Keep in step with docs/layout.md.
LAYERS: dict[str, int] = {
    "convpeft.core": 0,
    "convpeft.ops": 1,
    "convpeft.adapters": 2,
    "convpeft.memory": 2,
    "convpeft.optim": 2,
    "convpeft.data": 2,
    "convpeft.models": 2,
    "convpeft.methods": 3,
    "convpeft.train": 4,
    "convpeft.profiler": 4,
    "convpeft.export": 4,
    "convpeft.planner": 5,
    # entry points: the command lines and the package's own namespace
    "convpeft.plan": 6,
    "convpeft.profiler.cli": 6,
    "convpeft.profiler.__main__": 6,
    "convpeft": 6,
    "benchmarks": 7,
}
#: packages of one layer that must not import each other (each stands on the layers below)
SIBLINGS = {2: ("convpeft.adapters", "convpeft.memory", "convpeft.optim", "convpeft.data",
                "convpeft.models"),
            4: ("convpeft.train", "convpeft.profiler", "convpeft.export")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [*ROOT.glob("convpeft/**/*.py"), *ROOT.glob("benchmarks/**/*.py")]
    return {_module_name(p): p for p in sorted(files)}


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module an imported name lives in (a submodule if it is one, else its package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports(module: str) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every convpeft/benchmarks import in ``module``'s file,
    wherever it stands (module level, functions, ``TYPE_CHECKING`` blocks)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target and target != module:
                found.append((target, node.lineno))
    return found


def layer_of(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def _family(module: str, layer: int) -> str | None:
    return next((p for p in SIBLINGS.get(layer, ())
                 if module == p or module.startswith(p + ".")), None)


def test_every_module_has_a_layer():
    assert all(layer_of(m) >= 0 for m in MODULES)
    assert "convpeft.core.flops" in MODULES and "convpeft.ops.conv" in MODULES


def test_no_import_runs_up_a_layer():
    wrong = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t} (layer {layer_of(t)} above "
             f"{layer_of(m)})"
             for m in MODULES for t, line in imports(m) if layer_of(t) > layer_of(m)]
    assert not wrong, "\n".join(wrong)


def test_feature_packages_stand_alone():
    wrong = []
    for m in MODULES:
        layer = layer_of(m)
        mine = _family(m, layer)
        for t, line in imports(m):
            theirs = _family(t, layer) if layer_of(t) == layer else None
            if mine and theirs and theirs != mine:
                wrong.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}")
    assert not wrong, "\n".join(wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle():
    # a package's __init__ re-exporting its modules is not a circle, a module importing back its
    # own package's __init__ (which imports it) is, so edges into __init__ files stay
    graph = {m: {t for t, _ in imports(m) if not m.startswith(t + ".")} for m in MODULES}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("convpeft")))
def test_module_size(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)}: {lines} lines > {MAX_LINES}"
