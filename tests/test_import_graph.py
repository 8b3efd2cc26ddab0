"""The package's modules import each other one way, as the data flows (``docs/design.md``): the
value (``dual``) under the kernels (``backends``) under the rules (``rules``) under the functional
face (``functional``) under the modules (``nn``) under the trainer and the oracle; at module
level, with no circle, and inside a function only to load an optional part late (the compiled
extension, Triton, a backend).

Read from the source with ``ast``: an import circle hidden inside a function body (a rule module
imported by the ``Dual`` it extends) fails here, as does one at module level, and an import of a
higher layer.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fgkernels"

# module -> the package modules it may import inside a function: the parts loaded on first use.
LATE_IMPORTS = {
    "fgkernels.backends": {"fgkernels.backends.native.backend", "fgkernels.backends.triton",
                           "fgkernels.backends.triton.backend"},
    "fgkernels.backends.native": {"fgkernels._C", "fgkernels.backends.native.fakes"},
}
# The layers, lowest first; a module belongs to the first whose name prefixes its own.
LAYERS = [("fgkernels.dual",), ("fgkernels.backends", "fgkernels._C"), ("fgkernels.rules",),
          ("fgkernels.functional",), ("fgkernels.nn",), ("fgkernels.train", "fgkernels.testing"),
          ("fgkernels",)]


def layer_of(module: str) -> int:
    return next(i for i, prefixes in enumerate(LAYERS)
                if any(module == p or module.startswith(p + ".") for p in prefixes))


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    modules["fgkernels._C"] = PACKAGE / "_C"  # the compiled extension
    return modules


def _targets(module: str, path: Path, node: ast.ImportFrom, modules: dict) -> set[str]:
    """The package modules an ``from ... import ...`` statement loads."""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] +
                        ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if not base.startswith("fgkernels"):
        return set()
    found = set()
    for alias in node.names:
        name = f"{base}.{alias.name}"
        found.add(name if name in modules else base)
    return found - {module}


def _imports() -> tuple[dict[str, set], dict[str, set]]:
    """(module-level imports, imports inside functions) of every package module."""
    modules = _modules()
    top, late = {}, {}
    for module, path in modules.items():
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text())
        top[module], late[module] = set(), set()
        module_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                where = top if id(node) in module_level else late
                where[module] |= _targets(module, path, node, modules)
    return top, late


def _circle(graph: dict[str, set]) -> list[str]:
    """One circle of ``graph`` (a list of modules, the first repeated last), or []."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = "done"
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_no_import_circle():
    top, _ = _imports()
    # a package importing its own submodules is how a package is made, not a circle
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in top.items()}
    assert _circle(graph) == []


def test_no_import_against_the_flow():
    top, late = _imports()
    upward = {m: sorted(t for t in top[m] | late[m] if layer_of(t) > layer_of(m))
              for m in top}
    assert {m: ts for m, ts in upward.items() if ts} == {}


def test_imports_inside_functions_only_load_optional_parts():
    _, late = _imports()
    hidden = {m: sorted(ts - LATE_IMPORTS.get(m, set())) for m, ts in late.items()}
    assert {m: ts for m, ts in hidden.items() if ts} == {}


def test_the_checks_see_a_hidden_circle():
    """The finder itself: a circle through an import inside a function is found."""
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set()}) == []
