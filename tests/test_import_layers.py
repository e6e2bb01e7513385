"""Each layer imports downward only, lazy imports inside functions included (a lazy import hides a
circle, it does not break it):

- no module of aimv2_kernels or aimv2 reaches itself again through its imports (package `__init__`
  facades are left out there: they gather what lies below them);
- aimv2_kernels' layers, bottom up: the registry and what every layer may use (backend, auto_table,
  validation, reference, casts); what the backends share (layouts, the linear-CE chunk driver); the backends
  (torch_backend, triton_backend, cuda_backend: packages of one shape, their `__init__` included,
  never importing each other); the op layer (ops/); the nn modules; the integrations and the compile
  check. A module imports its own layer only inside its own package (or, for the two
  bottom layers, its own layer), and lower layers.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("aimv2_kernels", "aimv2")


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _modules(with_packages: bool = False) -> dict[str, Path]:
    """Module name -> file; package `__init__` files under the package's name when `with_packages`."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name != "__init__.py":
                found[_module_name(path)] = path
            elif with_packages:
                found[_module_name(path.parent)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import module` imports the module; else the names of base
                name_there = f"{base}.{alias.name}"
                targets.add(name_there if name_there in modules or name_there in EXTENSIONS else base)
    return {t for t in targets if (t in modules or t in EXTENSIONS) and t != name}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as a list of modules, or [] when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_import_circles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    circle = _cycle(graph)
    assert not circle, "import circle: " + " -> ".join(circle)


# Bottom up; each entry (layer, units): a unit is a package (its modules import each other freely) or,
# in the two bottom layers, the whole layer.
LAYERS = [
    ("registry and shared basics", ["aimv2_kernels.backend", "aimv2_kernels.auto_table", "aimv2_kernels.validation",
                                    "aimv2_kernels.reference", "aimv2_kernels.casts"]),
    ("shared by the backends", ["aimv2_kernels.layouts", "aimv2_kernels.linear_ce_chunks"]),
    ("backends", ["aimv2_kernels.torch_backend", "aimv2_kernels.triton_backend", "aimv2_kernels.cuda_backend"]),
    ("ops", ["aimv2_kernels.ops"]),
    ("modules", ["aimv2_kernels.nn"]),
    ("integrations and tools", ["aimv2_kernels.integrations", "aimv2_kernels.compile_check"]),
]
_SINGLE_UNIT_LAYERS = (0, 1)
# Compiled modules (no .py file) and the unit they belong to.
EXTENSIONS = {"aimv2_kernels._C": "aimv2_kernels.cuda_backend"}


def _place(module: str) -> tuple[int, str] | None:
    """(layer index, unit) of a module of aimv2_kernels, or None for the facade and aimv2."""
    module = EXTENSIONS.get(module, module)
    for rank, (_, units) in enumerate(LAYERS):
        for unit in units:
            if module == unit or module.startswith(unit + "."):
                return rank, (str(rank) if rank in _SINGLE_UNIT_LAYERS else unit)
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Edges that go up a layer, or sideways into another unit of the same layer."""
    bad = []
    for source, targets in sorted(graph.items()):
        here = _place(source)
        if here is None:
            continue
        for target in sorted(targets):
            there = _place(target)
            if there is None:
                bad.append(f"{source} -> {target} (outside the layers)")
            elif there[0] > here[0]:
                bad.append(f"{source} -> {target} (up: {LAYERS[here[0]][0]} -> {LAYERS[there[0]][0]})")
            elif there[0] == here[0] and there[1] != here[1]:
                bad.append(f"{source} -> {target} (sideways within {LAYERS[here[0]][0]})")
    return bad


def test_every_layer_imports_downward_only():
    modules = _modules(with_packages=True)
    layered = {name: path for name, path in modules.items() if _place(name) is not None}
    assert set(layered) > {"aimv2_kernels.backend", "aimv2_kernels.torch_backend", "aimv2_kernels.ops.norm"}
    graph = {name: _imports(name, path, modules) for name, path in layered.items()}
    assert not layer_violations(graph), "\n".join(layer_violations(graph))
    assert graph["aimv2_kernels.backend"] <= {"aimv2_kernels.auto_table"}, "the registry imports only its table reader"
    unplaced = [name for name in modules if name.startswith("aimv2_kernels.") and _place(name) is None]
    assert not unplaced, f"modules outside every layer: {unplaced}"


@pytest.mark.parametrize("edge, expected", [
    (("aimv2_kernels.triton_backend.rms_norm", "aimv2_kernels.backend"), []),
    (("aimv2_kernels.triton_backend.rms_norm", "aimv2_kernels.triton_backend.common"), []),
    (("aimv2_kernels.triton_backend.rms_norm", "aimv2_kernels.torch_backend.norm"), ["sideways"]),
    (("aimv2_kernels.cuda_backend.kernels", "aimv2_kernels.ops.attention"), ["up"]),
    (("aimv2_kernels.backend", "aimv2_kernels.validation"), []),
    (("aimv2_kernels.layouts", "aimv2_kernels.torch_backend"), ["up"]),
])
def test_layer_rule(edge, expected):
    source, target = edge
    found = layer_violations({source: {target}})
    assert [word for word in ("up", "sideways") if any(f"({word}" in v for v in found)] == expected


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
])
def test_cycle_finder(graph, expected):
    assert _cycle(graph) == expected
