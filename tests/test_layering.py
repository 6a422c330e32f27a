"""Imports point down: every module of the package imports only from its own floor or below, and
no modules import each other in a circle. Read from the source with ``ast``, function-level
imports included (a lazy import is still an arrow). The floor table lives here, and only here."""
import ast
import os

from conftest import REPO_ROOT

# Floors, lowest first: the rooms of ``megatron_jai`` (a top-level module or a sub-package) on each.
# What two higher rooms both need belongs on the lowest floor they share.
FLOORS = (
    ("compat", "cli", "paths", "config", "parallel", "presets"),
    ("kernels", "moe", "model", "data", "checkpoint"),
    ("upscale", "inference"),
    ("training", "hf", "evaluation"),
    ("replication",),  # drives tools/ and the entry scripts (by path: they are no modules)
)
# Groups of modules (or packages) that import nothing of the package but each other: the JAI
# modeling code is copied into every export and loaded by transformers on its own; the kernels
# carry their own torch references.
STANDALONE = (("megatron_jai.hf.configuration_jai", "megatron_jai.hf.modeling_jai"),
              ("megatron_jai.kernels",))
# Where each package's files are (setup.py installs kernels/ as megatron_jai.kernels).
PACKAGE_DIRS = {"megatron_jai": "megatron_jai", "megatron_jai.kernels": "kernels"}


def package_modules(root: str) -> dict:
    """Module name -> file path, for every ``.py`` file of the package under ``root``."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        base = os.path.join(root, folder)
        for directory, _, files in os.walk(base):
            for name in files:
                if not name.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(directory, name[:-3]), base).split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join([package, *parts]) if parts != ["."] else package] = \
                    os.path.join(directory, name)
    return found


def imported_modules(name: str, path: str, known: dict) -> set:
    """The package modules that module ``name`` imports, anywhere in its file."""
    is_package = os.path.basename(path) == "__init__.py"
    out = set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package upwards
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t if t in known else base for t in targets]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph(root: str) -> dict:
    known = package_modules(root)
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def floor(module: str) -> int:
    if module == "megatron_jai":
        return 0
    room = module.split(".")[1]
    for level, rooms in enumerate(FLOORS, 1):
        if room in rooms:
            return level
    raise AssertionError(f"{module} is on no floor: place megatron_jai.{room} in "
                         f"tests/test_layering.py FLOORS")


def upward_imports(graph: dict) -> list:
    return sorted(f"{a} (floor {floor(a)}) -> {b} (floor {floor(b)})"
                  for a, targets in graph.items() for b in targets if floor(b) > floor(a))


def circles(graph: dict) -> list:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_imports_point_down():
    assert upward_imports(import_graph(REPO_ROOT)) == []


def test_no_import_circles():
    assert circles(import_graph(REPO_ROOT)) == []


def test_standalone_groups_import_only_each_other():
    def inside(module, group):
        return any(module == g or module.startswith(g + ".") for g in group)

    graph = import_graph(REPO_ROOT)
    leaks = {m: sorted(t for t in targets if not inside(t, group))
             for group in STANDALONE for m, targets in graph.items() if inside(m, group)}
    assert all(any(inside(m, (g,)) for m in graph) for group in STANDALONE for g in group)
    assert {m: t for m, t in leaks.items() if t} == {}


def test_the_checks_see_lazy_relative_and_circular_imports(tmp_path):
    files = {
        "megatron_jai/__init__.py": "",
        "megatron_jai/config.py": "def f():\n    from megatron_jai.upscale import plan\n",
        "megatron_jai/upscale/__init__.py": "",
        "megatron_jai/upscale/plan.py": "from . import dus\n",
        "megatron_jai/upscale/dus.py": "import megatron_jai.upscale.plan.LayerPlan\n",
        "kernels/__init__.py": "",
        "kernels/routing.py": "from megatron_jai.config import f\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(str(tmp_path))
    assert graph["megatron_jai.kernels.routing"] == {"megatron_jai.config"}
    assert upward_imports(graph) == ["megatron_jai.config (floor 1) -> megatron_jai.upscale.plan "
                                     "(floor 3)"]
    assert circles(graph) == [["megatron_jai.upscale.dus", "megatron_jai.upscale.plan"]]
