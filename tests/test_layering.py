"""The import graph points down (STYLE.md): pure math imports no other part of embjax, the weight readers
import no model, and nothing below the engine imports it or the studies."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "embjax"
PURE = {"stats", "maps", "evaluate", "moments", "retrieval", "verification", "similarity", "fne", "svm",
        "accumulator", "cells"}


def _imports(path: pathlib.Path) -> set[str]:
    """Every embjax module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("embjax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("embjax"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return found


def test_weight_readers_import_no_model():
    offenders = {p.name: sorted(i for i in _imports(p) if i.startswith("embjax.models"))
                 for p in (ROOT / "weights").glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_pure_math_imports_only_pure_math():
    for name in PURE:
        path = ROOT / f"{name}.py"
        if not path.exists():
            continue
        deps = {i.split(".")[1] for i in _imports(path) if i.count(".") >= 1}
        assert deps <= PURE, (name, sorted(deps - PURE))


def test_nothing_below_the_engine_imports_it():
    for sub in ("models", "weights", "data"):
        for p in (ROOT / sub).rglob("*.py"):
            bad = sorted(i for i in _imports(p) if i.startswith(("embjax.extract", "embjax.members", "experiments")))
            assert not bad, (str(p), bad)
