"""The package's two halves: the attention library (din_fast, din_fast.compat,
din_fast.kernels) imports nothing from the CTR application (din_fast.ctr),
nothing imports in a circle, and the application's old import paths
(din_fast.training, din_fast.sharded.model, ...) still give its modules."""

import ast
import pathlib
import subprocess
import sys

import pytest

import din_fast
from din_fast import moved_modules

PACKAGE_DIR = pathlib.Path(din_fast.__file__).parent


def source_files():
    """{module name: path} of every module of the package, the kernels (which
    install from their own folder) included."""
    import din_fast.kernels

    roots = [("din_fast", PACKAGE_DIR),
             ("din_fast.kernels", pathlib.Path(din_fast.kernels.__path__[0]))]
    modules = {}
    for prefix, root in roots:
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((prefix, *parts))] = path
    return modules


def imported_modules(name, path, modules):
    """The package's modules that ``name`` imports anywhere in its file (a
    function's lazy import included); ``from package import submodule`` counts
    as the submodule, not the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names
                          if f"{base}.{alias.name}" in modules]
            targets = submodules or [base]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph():
    modules = source_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def is_application(name):
    return name == "din_fast.ctr" or name.startswith("din_fast.ctr.")


def test_the_library_imports_nothing_from_the_application():
    # ``python -m din_fast`` runs the command, the application's front door.
    graph = import_graph()
    assert any(is_application(name) for name in graph)      # the walk found both halves
    crossings = {name: sorted(filter(is_application, deps)) for name, deps in graph.items()
                 if not is_application(name) and name != "din_fast.__main__"}
    assert {name: deps for name, deps in crossings.items() if deps} == {}


def test_no_module_imports_in_a_circle():
    graph = import_graph()
    state = {}      # name -> "open" while on the walk's path, "done" after

    def walk(name, path):
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                pytest.fail("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                walk(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])


def test_importing_the_library_loads_no_application_module():
    code = ("import sys, din_fast, din_fast.functional, din_fast.modules, din_fast.two_stage, "
            "din_fast.compat.deepctr, din_fast.compat.fuxictr, din_fast.kernels; "
            "print(sorted(m for m in sys.modules if m.startswith('din_fast.ctr')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("old", sorted(moved_modules.MOVED))
def test_an_old_import_path_gives_the_moved_module_itself(old):
    import importlib

    if old == "sharded":
        pytest.importorskip("torchrec")
    module = importlib.import_module(f"din_fast.{old}")
    assert module is importlib.import_module(f"din_fast.ctr.{old}")
    assert module.__name__ == f"din_fast.ctr.{old}"      # not renamed by the alias


def test_old_paths_of_submodules_and_names():
    code = ("from din_fast.training import train; from din_fast.ctr.training import train as t2; "
            "from din_fast import DIN, BaseModel; from din_fast.ctr.models import DIN as D2; "
            "import din_fast.sharded.options as o, din_fast.ctr.sharded.options as o2; "
            "import sys; assert train is t2 and DIN is D2 and o is o2; "
            "assert sys.modules['din_fast.sharded.options'] is o2; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        din_fast.Nothing    # noqa: B018
