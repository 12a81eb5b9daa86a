"""The docs' description of the package is true of the code: docs/design.md's layer table (which the README
repeats) names every module once and no import points down it, the "where is what" table names modules
that exist, engines/__init__.py names the modules that import deepspeed when imported, and no module
imports another module's private name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "vbon_ds"
DESIGN = REPO / "docs" / "design.md"


TICKED = re.compile(r"`([^`]+)`")


def markdown_table(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table whose first line is `header`."""
    lines = text[text.index(header) :].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def table_text(text: str, header: str) -> str:
    """The markdown table whose first line is `header`, verbatim."""
    lines = text[text.index(header) :].splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("|"))])


def named_modules(cell: str) -> list[str]:
    """The module files a cell names, relative to vbon_ds/: `x.py` (a root module), `pkg/` (every file of
    the package) or `pkg/` (`a.py`, `b.py`) (its __init__.py and those files)."""
    names: list[str] = []
    for match in re.finditer(r"`(\w+)/`(?: \(([^)]*)\))?|`([\w/]+\.py)`", cell):
        folder, listed, module = match.groups()
        if module:
            names.append(module)
        elif listed is None:
            names.append(f"{folder}/")
        else:
            names += [f"{folder}/__init__.py"] + [f"{folder}/{name}" for name in TICKED.findall(listed)]
    return names


def layer_rows() -> list[tuple[str, list[str]]]:
    rows = markdown_table(DESIGN.read_text(), "| layer | modules |")
    return [(row[0], named_modules(row[1])) for row in rows]


def package_modules() -> list[str]:
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))


def layer_of() -> dict[str, int]:
    """Each module file of the package -> the index of its row in the layer table."""
    rows: dict[str, list[int]] = {}
    for index, (_, names) in enumerate(layer_rows()):
        for name in names:
            files = [m for m in package_modules() if m.startswith(name)] if name.endswith("/") else [name]
            for module in files:
                rows.setdefault(module, []).append(index)
    twice = {module: found for module, found in rows.items() if len(found) > 1}
    assert not twice, f"modules named in more than one layer row (row indices): {twice}"
    return {module: found[0] for module, found in rows.items()}


def module_file(dotted: str) -> str | None:
    """vbon_ds.a.b -> 'a/b.py' or 'a/b/__init__.py' relative to vbon_ds/, if it is a module."""
    parts = dotted.split(".")[1:]
    for candidate in (Path(*parts).with_suffix(".py") if parts else None, Path(*parts, "__init__.py")):
        if candidate is not None and (PACKAGE / candidate).is_file():
            return candidate.as_posix()
    return None


def imported_modules(path: Path) -> set[str]:
    """Every vbon_ds module `path` imports, at the top or inside a function (relative to vbon_ds/)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {module_file(a.name) for a in node.names if a.name.split(".")[0] == "vbon_ds"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vbon_ds":
            assert node.level == 0, f"{path}: relative import"
            # `from vbon_ds.jobs import evaluate` imports the submodule; `from vbon_ds.core.bon import x`
            # the module itself
            found |= {module_file(f"{node.module}.{a.name}") or module_file(node.module) for a in node.names}
    return found - {None}


def test_every_module_is_in_exactly_one_layer_row_and_every_named_module_exists():
    layers = layer_of()
    assert [m for m in package_modules() if m not in layers] == [], "modules missing from the layer table"
    missing = sorted(m for m in layers if not (PACKAGE / m).is_file())
    assert missing == [], "the layer table names modules that do not exist"


def test_no_module_imports_from_a_lower_row_of_the_layer_table():
    layers, labels = layer_of(), [label for label, _ in layer_rows()]
    upward = []
    for module in package_modules():
        for target in imported_modules(PACKAGE / module):
            if layers[target] > layers[module]:
                upward.append(f"{module} [{labels[layers[module]]}] -> {target} [{labels[layers[target]]}]")
    assert upward == []


def test_the_layer_check_sees_function_level_and_submodule_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from vbon_ds.jobs import evaluate\n"
        "def f():\n    from vbon_ds.core.bon import log_cdf\n    import vbon_ds.kernels\n"
    )
    assert imported_modules(source) == {"jobs/evaluate.py", "core/bon.py", "kernels/__init__.py"}


def test_package_docstrings_name_their_layer_as_the_table_does():
    layers, labels = layer_of(), [label for label, _ in layer_rows()]
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        stated = re.match(r"Layer (\w+)", ast.get_docstring(ast.parse(init.read_text())) or "")
        module = init.relative_to(PACKAGE).as_posix()
        if stated:
            assert labels[layers[module]].startswith(f"{stated[1]}. "), module


def test_readme_layer_table_is_the_design_notes():
    header = "| layer | modules | what it holds |"
    assert table_text((REPO / "README.md").read_text(), header) == table_text(DESIGN.read_text(), header)


def test_where_is_what_names_modules_that_exist():
    rows = markdown_table(DESIGN.read_text(), "| question | where |")
    named = [name for row in rows for name in named_modules(row[1])]
    assert "algorithms/objective.py" in named and "algorithms/registry.py" in named
    assert [n for n in named if not (PACKAGE / n).exists()] == []


def module_level_imports(tree: ast.Module) -> list[str]:
    """Names of the modules a file imports when it is imported (not those imported inside functions)."""
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_engines_docstring_names_the_modules_that_import_deepspeed_when_imported():
    """engines/__init__.py says which submodules load deepspeed at import; every other one imports it
    inside the functions that use it."""
    importing = sorted(
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if any(n.split(".")[0] == "deepspeed" for n in module_level_imports(ast.parse(p.read_text())))
    )
    doc = ast.get_docstring(ast.parse((PACKAGE / "engines" / "__init__.py").read_text()))
    stated = doc.split("\n\n")[0]
    assert [f"engines/{name}" for name in TICKED.findall(stated) if name.endswith(".py")] == importing


@pytest.mark.parametrize("root", ["vbon_ds", "tests", "benchmarks"])
def test_no_module_imports_a_private_name_of_another(root):
    private = []
    for path in sorted((REPO / root).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vbon_ds":
                rel = path.relative_to(REPO).as_posix()
                private += [f"{rel}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []
