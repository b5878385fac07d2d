"""The import graph points down (STYLE.md): pure math imports no other part of embjax, the weight readers
import no model, nothing below the engine imports it or the studies, the converters do not import the
.h5 reader (but the Keras ones), and no circle of imports exists anywhere in the package (lazy imports
inside functions and `importlib.import_module("embjax....")` calls included)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "embjax"
PURE = {"stats", "maps", "head_maps", "evaluate", "moments", "retrieval", "verification", "similarity", "fne", "svm",
        "accumulator", "cells", "roc"}


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
        assert path.is_file(), f"embjax/{name}.py is listed as pure math but does not exist"
        deps = {i.split(".")[1] for i in _imports(path) if i.count(".") >= 1}
        assert deps <= PURE, (name, sorted(deps - PURE))


def test_nothing_below_the_engine_imports_it():
    for sub in ("models", "weights", "data"):
        for p in (ROOT / sub).rglob("*.py"):
            bad = sorted(i for i in _imports(p) if i.startswith(("embjax.extract", "embjax.members", "experiments")))
            assert not bad, (str(p), bad)


def _module_of(name: str) -> pathlib.Path | None:
    """The file of embjax module `name` (a package's __init__.py), or None if there is none."""
    parts = name.split(".")[1:]
    base = ROOT.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _import_module_literal(node) -> str | None:
    """The embjax module named by `importlib.import_module("embjax....")` (a string literal), else None."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    value = node.args[0].value
    if name == "import_module" and isinstance(value, str) and value.split(".")[0] == "embjax":
        return value
    return None


def _graph() -> dict[str, set[str]]:
    """embjax module -> the embjax modules it imports (at module level or inside functions).

    `from embjax.a import b` imports the module embjax.a.b when there is one, else embjax.a (b is a name
    in it). An import of an embjax module with no file fails the test: a rename must not hide an edge."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "embjax"]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == "embjax":
                targets = [f"{node.module}.{a.name}" if _module_of(f"{node.module}.{a.name}") else node.module
                           for a in node.names]
            elif _import_module_literal(node):  # importlib.import_module("embjax.x"): an import all the same
                targets = [_import_module_literal(node)]
            else:
                assert not (isinstance(node, ast.ImportFrom) and node.level), (str(path), "relative import")
                continue
            for target in targets:
                assert _module_of(target) is not None, (str(path), f"imports {target}, which has no file")
                edges.add(target)
        graph[name] = edges - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_anywhere_in_the_package():
    # Lazy (function-level) imports count: a circle through them still ties the modules together.
    assert _cycles(_graph()) == []


def test_the_circle_check_finds_a_planted_circle():
    graph = _graph()
    assert "embjax.models.efficientnet" in graph and "embjax.models.layers" in graph["embjax.models.efficientnet"]
    planted = {**graph, "embjax.models.layers": graph["embjax.models.layers"] | {"embjax.models.efficientnet"}}
    assert _cycles(planted) == [["embjax.models.efficientnet", "embjax.models.layers"]]


def test_the_graph_has_the_edges_of_importlib_calls():
    # embjax.data imports its tfds reader lazily through importlib (tfds is slow to import); a circle
    # through such an edge must be found like any other.
    assert "embjax.data.tfds_source" in _graph()["embjax.data"]


def test_converters_do_not_import_the_h5_reader():
    # The converter framework is embjax.models.convert.framework; only the Keras converters, whose input
    # is what the .h5 reader returns, may name it.
    for p in (ROOT / "models" / "convert").glob("*.py"):
        if p.name.startswith("keras_"):
            continue
        assert "embjax.weights.h5" not in _imports(p), p.name
