"""Every name the API reference documents has a complete docstring, and
every option of the din-fast commands a --help line.

The reference pages (docs/reference/*.md) name their objects with
mkdocstrings' ``::: target`` lines; each target is a module (its public
functions and classes), a class (its constructor and public methods) or a
function. For each callable the docstring must exist, list every parameter as
an entry of its Google-style ``Args:`` section (what mkdocstrings renders as
the parameter table; the constructor's arguments in the class docstring,
mkdocs.yml merges ``__init__`` into the class), and carry a ``Raises:``
section where its own body raises a ValueError or TypeError (InputError and
its subclasses included). Raises inside a helper it calls are not counted:
only what the source shows, so the check has no false positives.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import re
import textwrap
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"

ARGS_HEADERS = ("Args", "Arguments", "Parameters")
SECTION = re.compile(r"^(\w[\w ]*):\s*$")
ENTRY = re.compile(r"^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:")


def reference_targets() -> list:
    targets = []
    for page in sorted(REFERENCE.glob("*.md")):
        targets += re.findall(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), re.M)
    return targets


def resolve(target: str):
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for part in parts[split:]:
            obj = getattr(obj, part)
        return obj
    raise LookupError(target)


def module_members(module) -> list:
    """The callables mkdocstrings renders of a module: ``__all__``'s, else the
    public functions and classes defined in it (not the imported ones).
    Constants in ``__all__`` (din_fast.ctr.sharded.SHARDING_TYPES) render
    with their value and the docstring under their assignment; they have no
    arguments to check."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [name for name, value in vars(module).items()
                 if not name.startswith("_")
                 and (inspect.isfunction(value) or inspect.isclass(value))
                 and value.__module__ == module.__name__]
    members = [(f"{module.__name__}.{name}", getattr(module, name)) for name in names]
    return [(name, value) for name, value in members if callable(value)]


def class_methods(name: str, cls) -> list:
    methods = []
    for attribute, value in vars(cls).items():
        if attribute.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value):
            methods.append((f"{name}.{attribute}", value))
    return methods


def documented() -> list:
    """(name, object) of every documented module, function, class and method."""
    found = []
    for target in reference_targets():
        obj = resolve(target)
        members = module_members(obj) if inspect.ismodule(obj) else [(target, obj)]
        if inspect.ismodule(obj):
            found.append((target, obj))
        for name, member in members:
            found.append((name, member))
            if inspect.isclass(member):
                found += class_methods(name, member)
    return found


def sections(doc: str) -> dict:
    """Google-style sections of a docstring: header -> its lines, dedented."""
    result, current = {}, None
    for line in doc.splitlines():
        header = SECTION.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            result[current] = []
        elif current is not None:
            if line and not line.startswith(" "):
                current = None              # the section ended: prose follows
            else:
                result[current].append(line)
    return {key: textwrap.dedent("\n".join(lines)).splitlines() for key, lines in result.items()}


def listed_arguments(doc: str) -> set:
    """The parameter names the ``Args:`` section lists, one entry each."""
    names = set()
    for header in ARGS_HEADERS:
        for line in sections(doc).get(header, []):
            entry = ENTRY.match(line)
            if entry:
                names.add(entry.group(1).lstrip("*"))
    return names


def parameters(function) -> list:
    return [p.name for p in inspect.signature(function).parameters.values()
            if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def raises_directly(function) -> list:
    """The ValueError/TypeError subclasses a ``raise`` in the function's own
    body (not a nested function's) names."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return []
    node = ast.parse(source).body[0]
    raised, stack = [], list(node.body)
    while stack:
        child = stack.pop()
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(child, ast.Raise) and child.exc is not None:
            exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
            if isinstance(exc, ast.Name):
                cls = function.__globals__.get(exc.id, getattr(builtins, exc.id, None))
                if inspect.isclass(cls) and issubclass(cls, (ValueError, TypeError)):
                    raised.append(exc.id)
        stack.extend(ast.iter_child_nodes(child))
    return raised


def gaps(name: str, obj) -> list:
    doc = inspect.getdoc(obj) or ""
    if not doc.strip():
        return [f"{name}: no docstring"]
    if inspect.ismodule(obj):
        return []
    function = obj.__dict__.get("__init__") if inspect.isclass(obj) else obj
    if function is None:
        return []
    problems = []
    missing = [p for p in parameters(function) if p not in listed_arguments(doc)]
    if missing:
        problems.append(f"{name}: Args does not list {', '.join(missing)}")
    raised = raises_directly(function)
    if raised and "Raises" not in sections(doc):
        problems.append(f"{name}: raises {', '.join(sorted(set(raised)))} "
                        "but has no Raises section")
    return problems


DOCUMENTED = documented()


@pytest.mark.parametrize("name, obj", DOCUMENTED, ids=[d[0] for d in DOCUMENTED])
def test_docstring_complete(name, obj):
    assert gaps(name, obj) == []


def cli_gaps() -> list:
    """Options of the din-fast commands whose --help says nothing about them,
    and commands without a description (docs/reference/cli.md shows --help)."""
    import argparse

    from din_fast.ctr.cli import build_parser

    (commands,) = [action for action in build_parser()._actions
                   if isinstance(action, argparse._SubParsersAction)]
    summaries = {action.dest: action.help for action in commands._choices_actions}
    problems = [f"din-fast {name}: no help in the command list"
                for name in commands.choices if not summaries.get(name)]
    for name, command in commands.choices.items():
        if not command.description:
            problems.append(f"din-fast {name}: no description")
        problems += [f"din-fast {name} {action.option_strings[-1]}: no help"
                     for action in command._actions if action.option_strings and not action.help]
    return problems


def test_cli_commands_documented():
    assert cli_gaps() == []


def test_reference_documents_the_package():
    """The check sees what the reference documents: every top-level name, at
    that name or where it is defined (din_fast.DIN at din_fast.ctr.models.DIN)."""
    import din_fast

    targets = reference_targets()
    undocumented = [name for name in din_fast.__all__ if f"din_fast.{name}" not in targets
                    and defining_target(getattr(din_fast, name)) not in targets]
    assert undocumented == []


def defining_target(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def test_checker_finds_gaps():
    """The checker itself: an undocumented argument, a grouped entry and a
    missing Raises are gaps; a raise in a nested function is not."""
    def complete(a, b=1, *args, c, **kwargs):
        """Do.

        Args:
            a (int): one.
            b: two,
                continued: still b's.
            c: three.

        Raises:
            ValueError: when.
        """
        if a:
            raise ValueError(a)

    def grouped(a, b):
        """Do.

        Args:
            a, b: both.
        """

    def undeclared(a):
        """Do.

        Args:
            a: one.
        """
        raise TypeError(a)

    def nested(a):
        """Do.

        Args:
            a: one.
        """
        def inner():
            raise ValueError(a)
        return inner

    assert gaps("complete", complete) == []
    assert gaps("grouped", grouped) == ["grouped: Args does not list a, b"]
    assert gaps("undeclared", undeclared) == [
        "undeclared: raises TypeError but has no Raises section"]
    assert gaps("nested", nested) == []
