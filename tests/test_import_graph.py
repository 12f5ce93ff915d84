"""The import graph of fastst has no cycle, and every module imports in a fresh interpreter.

The graph is read from the source with ``ast``: an edge A -> B for every ``import B`` /
``from B import name`` (``from P import m`` with P.m a module: an edge to P.m) of a fastst
module B in module A, at module level or inside a function. A function-level import is the
same dependency taken later, so it counts: deferring one side of a cycle into a function (or
behind ``importlib.import_module``) hides the cycle from the interpreter, not from this test.
Imports under ``if TYPE_CHECKING:`` run only for type checkers and are left out."""
import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "fastst"


def _modules(package_dir: Path) -> Dict[str, Path]:
    """Dotted module name -> source file, for every .py file under ``package_dir``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node of ``tree`` outside ``if TYPE_CHECKING:`` blocks, and the
    string arguments of ``importlib.import_module("...")`` calls (as module names)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            yield node.args[0].value
        stack.extend(ast.iter_child_nodes(node))


def import_graph(package_dir: Path = PACKAGE_DIR) -> Dict[str, Set[str]]:
    """Module -> the package's modules it imports (see the module docstring)."""
    modules = _modules(package_dir)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = []
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, str):
                targets.append(node)
            elif isinstance(node, ast.Import):
                targets.extend(alias.name for alias in node.names)
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` as [a, b, ..., a], or [] when it has none (iterative DFS)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in sorted(graph):
        if root in state:
            continue
        path, iterators = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while path:
            child = next(iterators[-1], None)
            if child is None:
                state[path.pop()] = 2
                iterators.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                iterators.append(iter(sorted(graph[child])))
    return []


def dependency_order(graph: Dict[str, Set[str]]) -> List[str]:
    """The modules with every module after the modules it imports (where the graph has no
    cycle; a cycle is broken where it is met)."""
    order, seen = [], set()

    def place(name: str) -> None:
        seen.add(name)
        for dependency in sorted(graph[name]):
            if dependency not in seen:
                place(dependency)
        order.append(name)

    for name in sorted(graph):
        if name not in seen:
            place(name)
    return order


def test_the_graph_sees_top_level_function_level_and_importlib_imports(tmp_path):
    """The reader on a small package: a cycle closed by a function-level import, relative and
    importlib imports, ``from package import submodule``, and TYPE_CHECKING imports left out."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import importlib\n"
                                     "def load():\n    return importlib.import_module('pkg.c')\n")
    (pkg / "a.py").write_text("from pkg.sub import b\nfrom . import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\n"
                                      "if TYPE_CHECKING:\n    from pkg import a\n"
                                      "def late():\n    from ..c import value\n")
    (pkg / "c.py").write_text("value = 1\ndef f():\n    from pkg.sub.b import late\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": {"pkg.c"}, "pkg.a": {"pkg.sub.b", "pkg.c"}, "pkg.sub": set(),
                     "pkg.sub.b": {"pkg.c"}, "pkg.c": {"pkg.sub.b"}}
    assert find_cycle(graph) == ["pkg.c", "pkg.sub.b", "pkg.c"]
    graph["pkg.c"] = set()
    assert find_cycle(graph) == []
    assert dependency_order(graph) == ["pkg.c", "pkg", "pkg.sub.b", "pkg.a", "pkg.sub"]


def test_fastst_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle) + \
        " (move what both sides need into a module below them)"


def test_every_module_imports_in_a_fresh_interpreter_in_dependency_order():
    """Each module, after the modules it imports, in one fresh interpreter: a module that only
    works when something else happened to be imported first fails here."""
    order = dependency_order(import_graph())
    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    try:\n"
              "        importlib.import_module(name)\n"
              "    except Exception as error:\n"
              "        sys.exit(f'{name}: {type(error).__name__}: {error}')\n")
    result = subprocess.run([sys.executable, "-c", script, *order], capture_output=True,
                            text=True, cwd=PACKAGE_DIR.parent, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
