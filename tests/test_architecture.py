"""The package's import rules (ARCHITECTURE.md), read from the source: imports run one way through the
layers, no module imports another's underscore names, imports form no cycle, and files stay small unless
they say why."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "prunekit"

#: Lowest first; a module may import from its own layer and the layers below it.
LAYERS = [
    ("core", ["prunekit.core"]),
    ("methods", ["prunekit.methods", "prunekit.fhe"]),
    ("structure", ["prunekit.structure"]),
    ("engines", ["prunekit.engines", "prunekit.checks"]),
    ("reporting", ["prunekit.summary", "prunekit.attention"]),
    ("pruner", ["prunekit.pruner", "prunekit.assembly", "prunekit.recipes"]),
    (
        "above the pruner",
        [
            "prunekit.compact",
            "prunekit.plans",
            "prunekit.saving",
            "prunekit.compressed",
            "prunekit.oneshot",
            "prunekit.export",
            "prunekit.sparse",
            "prunekit.api",
            "prunekit.sensitivity",
            "prunekit.compare",
        ],
    ),
    ("integrations", ["prunekit.hf", "prunekit.integrations"]),
    (
        "tools",
        ["prunekit.bench", "prunekit.data", "prunekit.demo", "prunekit.cli", "prunekit.commands", "prunekit.__main__"],
    ),
]
#: Files allowed past ~400 lines, each with its reason stated at its top.
LONG_FILES_LIMIT = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(name: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    return None


def imports(path: Path, top_level_only: bool = False):
    """(imported module, imported names, line) of every prunekit import in a file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("prunekit"):
                names = [alias.name for alias in node.names]
                # "from . import masks" imports a module, not a name
                yield target, names, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("prunekit"):
                    yield alias.name, [], node.lineno


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in SOURCES if p.name != "__init__.py" or p.parent != PACKAGE]
    unplaced = [n for n in unplaced if layer_of(n) is None]
    assert not unplaced, f"add these modules to a layer in LAYERS (and ARCHITECTURE.md): {unplaced}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_run_one_way(path):
    name = module_name(path)
    own = layer_of(name)
    if own is None:  # the package's __init__: the public API, above everything
        return
    for target, names, line in imports(path):
        for imported in [target] + [f"{target}.{n}" for n in names]:
            layer = layer_of(imported)
            if layer is not None and layer > own and layer_of(target) is not None:
                if layer_of(target) > own:
                    pytest.fail(
                        f"{name} (layer {LAYERS[own][0]!r}) imports {target} (layer {LAYERS[layer_of(target)][0]!r}) "
                        f"at line {line}: imports must run downwards"
                    )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_no_module_imports_another_modules_private_names(path):
    name = module_name(path)
    for target, names, line in imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and target != name:
            pytest.fail(f"{name} imports {private} from {target} at line {line}: make them public or move them")


def test_imports_have_no_cycle():
    graph = {}
    modules = {module_name(p): p for p in SOURCES}
    for name, path in modules.items():
        edges = set()
        for target, names, _ in imports(path):  # imports inside functions too: a lazy import is still a cycle
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != name:
                    edges.add(candidate)
                    break
        graph[name] = edges
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_long_files_say_why(path):
    lines = path.read_text().splitlines()
    if len(lines) > LONG_FILES_LIMIT:
        head = "\n".join(lines[:40]).lower()
        assert "lines because" in head, (
            f"{module_name(path)} has {len(lines)} lines: split it, or state at its top why it is long "
            "('Over 400 lines because ...')"
        )


def test_importing_prunekit_loads_neither_the_benchmark_harness_nor_the_data_readers():
    import subprocess
    import sys

    code = "import sys, prunekit; print(sorted(m for m in ('prunekit.bench', 'prunekit.data') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    code = "import prunekit as pk; print(pk.bench.LeNet300100.__name__, pk.data.read_idx.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["LeNet300100", "read_idx"]
