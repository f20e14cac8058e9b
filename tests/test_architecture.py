"""The architecture's rules, checked on the source (docs/architecture.md): no import cycle between any two modules, no
private name imported from another module, and short functions and classes in the application layer and the front
ends. The floors themselves (each imports only those below it) are `lint-imports`' contract in pyproject.toml, run by
the lint step."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_ctcolor"
#: The training loops and the phantom: their long functions are recipes read top to bottom.
EXEMPT = ("training", "phantom")
#: Every other floor: a module at the package's root or a package.
READABLE = tuple(
    sorted(
        name
        for p in SRC.iterdir()
        if (name := p.stem if p.suffix == ".py" else p.name) not in EXEMPT
        and ((p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists()))
    )
)
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 80, 400


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "slicer_module" not in p.parts)


def test_no_import_cycle_between_any_two_modules():
    """A package and its own modules count too (``io`` and ``io.color_read`` imported each other)."""
    graph = grimp.build_graph("napari_ctcolor")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                cycles.append(" -> ".join((module, *chain)))
    assert cycles == []


def test_the_checks_see_a_cycle_and_a_private_import():
    """The two checks above and below, on a graph and a module built to break them."""
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg")
    graph.add_import(importer="pkg", imported="pkg.a")
    assert graph.find_shortest_chain(importer="pkg.b", imported="pkg.a") == ("pkg.b", "pkg", "pkg.a")
    assert _private_imports(ast.parse("from .dicom import _read_header\nfrom os import path")) == ["_read_header"]


def _private_imports(tree: ast.Module) -> list[str]:
    return [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]


def test_no_private_name_is_imported_from_another_module():
    found = {
        str(p.relative_to(SRC)): names
        for p in _sources()
        if (names := _private_imports(ast.parse(p.read_text(encoding="utf-8"))))
    }
    assert found == {}


def _numba_kernel(node: ast.AST) -> bool:
    """A function compiled by numba (``@numba.njit(...)``, ``@njit``): one machine-code loop, whose pieces would
    cost a call per voxel inside the hot loop if split, so it may be long."""
    decorators = getattr(node, "decorator_list", [])
    return any("njit" in ast.unparse(d) or "numba.jit" in ast.unparse(d) for d in decorators)


def _long_definitions(tree: ast.Module) -> list[str]:
    """Functions over `MAX_FUNCTION_LINES` and classes over `MAX_CLASS_LINES` whose docstring does not say why they
    must be one piece, numba kernels aside (`_numba_kernel`)."""
    long = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) or _numba_kernel(node):
            continue
        limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
        lines = node.end_lineno - node.lineno + 1
        if lines > limit and "one piece" not in (ast.get_docstring(node) or ""):
            long.append(f"{node.name} ({lines} lines)")
    return long


def test_the_length_check_sees_a_long_function_and_accepts_an_explained_one():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    long = ast.parse(f"def long():\n{body}\n")
    explained = ast.parse(f'def long():\n    """It must be one piece: ..."""\n{body}\n')
    kernel = ast.parse(f"@numba.njit(parallel=True, cache=True)\ndef long():\n{body}\n")
    assert _long_definitions(long) == [f"long ({MAX_FUNCTION_LINES + 1} lines)"] and _long_definitions(explained) == []
    assert _long_definitions(kernel) == []
    assert "engines" in READABLE and "app" in READABLE and not set(EXEMPT) & set(READABLE)


@pytest.mark.parametrize("floor", READABLE)
def test_functions_and_classes_are_short(floor):
    """At most `MAX_FUNCTION_LINES` per function and `MAX_CLASS_LINES` per class, unless the docstring says why it
    must be one piece, in every floor but `EXEMPT` (numba kernels aside)."""
    paths = [SRC / f"{floor}.py"] if (SRC / f"{floor}.py").is_file() else sorted((SRC / floor).rglob("*.py"))
    long = {
        str(path.relative_to(SRC)): found
        for path in paths
        if (found := _long_definitions(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert long == {}


def _imported_modules(tree: ast.Module) -> list[str]:
    """The absolute names of the modules a script imports (``from napari_ctcolor.engines.register.refine import X`` ->
    ``napari_ctcolor.engines.register.refine``)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_the_slicer_module_script_calls_the_application_not_the_engines():
    """Slicer loads ``slicer_module/CTColor.py`` as a script, outside the package, so `lint-imports`' contract that
    the front ends never import the engines does not see it: checked here."""
    below = ("napari_ctcolor.engines", "napari_ctcolor.models", "napari_ctcolor.training")
    script = SRC / "slicer" / "slicer_module" / "CTColor.py"
    imported = _imported_modules(ast.parse(script.read_text(encoding="utf-8")))
    assert any(name.startswith("napari_ctcolor.app") for name in imported)
    assert [name for name in imported if name.startswith(below)] == []
    assert _imported_modules(ast.parse("from napari_ctcolor.engines.register.refine import X")) == [
        "napari_ctcolor.engines.register.refine"
    ]
