"""The package's layout rules (DESIGN.md): ``pe/`` never imports ``extend/``, and nothing
outside ``pe/`` probes an encoding with ``hasattr`` or tests an encoding's or id scheme's
name in code."""

import ast
import pathlib
import re

import poslab
from poslab import pe, positions

ROOT = pathlib.Path(poslab.__file__).parent


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_pe_imports_nothing_from_extend():
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in _imports(path) if n.startswith("poslab.extend"))
        for path in (ROOT / "pe").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def _outside_pe():
    return [p for p in ROOT.rglob("*.py") if "pe" not in p.relative_to(ROOT).parts[:1]]


def test_nothing_outside_pe_probes_an_encoding_with_hasattr():
    hits = []
    for path in _outside_pe():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("hasattr", "getattr"):
                target = ast.unparse(node.args[0]) if node.args else ""
                if target == "pe" or target.endswith(".pe") or "encoding" in target:
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert hits == []


def test_nothing_outside_pe_compares_with_an_encoding_or_scheme_name():
    """``x == "seqpe"``, ``x != "rope"``, ``x in ("randomized", ...)``: each encoding and id
    scheme carries its own facts instead (class attributes, hooks, SchemeFacts)."""
    known = set(pe.names()) | set(positions.scheme_names())
    about = re.compile(r"\b(pe|positions|scheme|encoding)\b")  # the compared value is an encoding or scheme
    hits = []
    for path in _outside_pe():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare) or not about.search(ast.unparse(node)):
                continue
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                for value in values:
                    if isinstance(value, ast.Constant) and value.value in known:
                        hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert hits == []


def test_every_module_of_pe_is_imported_so_an_encoding_registers_by_being_defined():
    import sys

    for path in (ROOT / "pe").glob("*.py"):
        if path.stem != "__init__":
            assert f"poslab.pe.{path.stem}" in sys.modules, path.stem
