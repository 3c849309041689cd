"""The package's shape (issues 11, 18): one folder per stage, each importing only from the stages upstream
of it; no circle in the import graph, no soup import hidden inside a function, modules under ~400 lines,
functions under ~80, and every module importable alone. Read with `ast`, so the checks need no import of
soup and name the file and line at fault."""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "soup"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# The console script installs its signal handlers before it imports the CLI (and with it torch).
LAZY_IMPORTS_ALLOWED = {"soup.__main__"}
# The stages, in the order data flows through them: recipe -> train -> checkpoint -> cook -> eval -> submit/export.
# A stage imports only from the stages before it, never from one after it. soup.errors and soup.text (how
# errors and outside names are printed) are below them all;
# the entry points (soup.cli and its command modules, soup.demo, soup.__main__, the package itself) sit above
# them all.
STAGES = ["recipe", "models", "data", "fast", "train", "outside", "score", "cook", "judge", "ship"]
BELOW_STAGES = {"soup.errors", "soup.text"}
ABOVE_STAGES = {"soup", "soup.cli", "soup.demo", "soup.__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _with_parents(name: str) -> list[str]:
    """Importing soup.a.b runs soup.a's __init__ first: that is an edge too."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in MODULES]


def _targets(node: ast.AST, importer: str) -> list[str]:
    """The soup modules an import statement loads."""
    if isinstance(node, ast.Import):
        found = []
        for alias in node.names:
            parts = alias.name.split(".")
            found += [".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in MODULES]
        return found
    if node.level:  # relative: resolve against the importer's package
        package = importer if _is_package(importer) else importer.rpartition(".")[0]
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    if base != "soup" and not base.startswith("soup."):
        return []
    found = _with_parents(base)
    found += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return found


def _imports(name: str) -> list[tuple[str, int, bool]]:
    """(target, line, inside a function) for every soup import of module `name`."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                # A module's own packages are initialised before it runs: naming them is no edge.
                found.extend((t, child.lineno, in_function) for t in _targets(child, name)
                             if t != name and not name.startswith(t + "."))
            visit(child, nested)

    visit(tree, False)
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {t for t, _, _ in _imports(name)} for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a readable path."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        start = min(component)
        path, seen = [start], {start}
        # Walk inside the component until the path closes: every module in it reaches `start` again.
        while True:
            nxt = sorted(w for w in graph[path[-1]] if w in component)
            closing = start in nxt
            if closing:
                cycles.append(path + [start])
                break
            step = next((w for w in nxt if w not in seen), nxt[0])
            if step in seen:
                cycles.append(path[path.index(step):] + [step])
                break
            path.append(step)
            seen.add(step)
    return cycles


def test_import_edges_are_read():
    def targets(source, importer):
        return _targets(ast.parse(source).body[0], importer)

    assert targets("from soup.models import distributed", "soup.data.pipeline") == ["soup.models",
                                                                                     "soup.models.distributed"]
    assert targets("from soup import errors", "soup.data.pipeline") == ["soup.errors"]
    assert targets("from soup.models.metrics import scores", "soup.cook.cooking") == ["soup.models",
                                                                                      "soup.models.metrics"]
    assert targets("from .metrics import scores", "soup.models.inference") == ["soup.models",
                                                                               "soup.models.metrics"]
    assert targets("import soup.recipe.spec", "soup.cli") == ["soup.recipe", "soup.recipe.spec"]
    assert targets("import torch.nn", "soup.cli") == []


def test_cycle_finder_names_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _is_above(module: str) -> bool:
    return module in ABOVE_STAGES or module.startswith("soup.cli.")


def _rank(module: str) -> int:
    """A module's place in the data flow: its stage's index; -1 below every stage, len(STAGES) above."""
    if module in BELOW_STAGES:
        return -1
    if _is_above(module):
        return len(STAGES)
    return STAGES.index(module.split(".")[1])


def _backward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{importer} imports {target} ({target.split('.')[1]} comes after {importer.split('.')[1]})"
            for importer in sorted(graph) for target in sorted(graph[importer]) if _rank(target) > _rank(importer)]


def test_every_module_sits_in_a_stage():
    loose = [name for name in MODULES if name not in BELOW_STAGES and not _is_above(name)
             and (name.count(".") == 0 or name.split(".")[1] not in STAGES)]
    assert not loose, ("modules outside every stage (move them into one of soup/" + ", soup/".join(STAGES) +
                       ", or add a stage to STAGES in its data-flow place): " + ", ".join(loose))


def test_stage_direction_rule_names_a_backward_import():
    graph = {"soup.cook.methods": {"soup.score.stats", "soup.judge.report"}, "soup.score.stats": set(),
             "soup.judge.report": {"soup.cook.methods"}, "soup.cli": {"soup.judge.report"}}
    assert _backward_imports(graph) == ["soup.cook.methods imports soup.judge.report (judge comes after cook)"]


def test_stages_import_only_from_upstream():
    backward = _backward_imports(_graph())
    assert not backward, ("imports against the data flow (" + " -> ".join(STAGES) + "): " + "; ".join(backward))


def test_import_graph_has_no_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_soup_import_inside_a_function():
    hidden = [f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
              for name in MODULES if name not in LAZY_IMPORTS_ALLOWED
              for target, line, in_function in _imports(name) if in_function]
    assert not hidden, "imports inside functions (move them to the top of the module): " + "; ".join(hidden)


def test_modules_are_short():
    long = [f"{path.relative_to(ROOT)} ({n} lines)" for path in MODULES.values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines: " + ", ".join(long)


def test_functions_are_short():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(long)


# Each soup module is imported in a process of its own in which no other soup module was ever loaded: a
# fresh interpreter loads the third-party libraries once (torch alone takes seconds), then forks one child
# per module. A circle that only works in one import order fails here.
_IMPORT_EACH = textwrap.dedent("""
    import importlib, os, sys, traceback
    for heavy in ("torch", "torchvision", "timm", "numpy", "PIL.Image", "yaml", "rich.console", "click",
                  "safetensors.torch"):
        try:
            importlib.import_module(heavy)
        except ImportError:
            pass
    assert not [m for m in sys.modules if m == "soup" or m.startswith("soup.")]
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status:
            failed.append(name)
    print("FAILED:" + ",".join(failed))
""")


def test_each_module_imports_alone():
    names = [n for n in MODULES if n != "soup.__main__"] + ["soup.__main__"]
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *names], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    failed = done.stdout.strip().rpartition("FAILED:")[2]
    assert not failed, f"modules that fail to import alone: {failed}\n{done.stderr[-3000:]}"


# Nevers (issue 32): links the stage order allows but the design does not. cook reads an imported
# ingredient's unknown start from its record, not from the importer; judge reads a draw's pruning from its
# record, not by re-deriving it with train's code; models/ (the records) knows no soup method by name, so
# that a new method touches soup/cook alone.
NEVER_IMPORTS = {"cook": "outside", "judge": "train"}


def _never_imported(graph: dict[str, set[str]]) -> list[str]:
    return [f"{importer} imports {target}" for importer in sorted(graph) for target in sorted(graph[importer])
            if importer.count(".") and target.count(".")
            and NEVER_IMPORTS.get(importer.split(".")[1]) == target.split(".")[1]]


def test_never_imports_are_named():
    graph = {"soup.cook.cooking": {"soup.outside.importing", "soup.models.records"},
             "soup.judge.page": {"soup.train.prune"}, "soup.judge.card": {"soup.cook.batchnorm"}}
    assert _never_imported(graph) == ["soup.cook.cooking imports soup.outside.importing",
                                      "soup.judge.page imports soup.train.prune"]


def test_cook_never_imports_outside_nor_judge_train():
    found = _never_imported(_graph())
    assert not found, "imports the design rules out (" + ", ".join(f"{a} -> {b}" for a, b in
                                                              NEVER_IMPORTS.items()) + "): " + "; ".join(found)


def _method_names() -> list[str]:
    """The names soup/cook/methods.py registers with @soup_method("name", ...)."""
    tree = ast.parse((PACKAGE / "cook" / "methods.py").read_text(encoding="utf-8"))
    return [decorator.args[0].value for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            for decorator in node.decorator_list
            if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "soup_method"]


def _method_mentions(source: str, names: list[str]) -> list[str]:
    """Each string in `source` (docstrings and comments too) that names one of `names` as a word."""
    words = {name: re.compile(rf"\b{re.escape(name)}\b", re.IGNORECASE) for name in names}
    texts = [node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)
             and isinstance(node.value, str)]
    texts += [token.string for token in tokenize.generate_tokens(io.StringIO(source).readline)
              if token.type == tokenize.COMMENT]
    return [f"{name} in {text[:60]!r}" for text in texts for name, word in words.items() if word.search(text)]


def test_models_names_no_soup_method():
    names = _method_names()
    assert {"uniform", "greedy", "stock"} <= set(names)  # the registry is read, not an empty list
    assert _method_mentions('FIELDS = {"stock": 1}  # a greedy step\n', names) == [
        "stock in 'stock'", "greedy in '# a greedy step'"]
    found = [f"{path.relative_to(ROOT)}: {mention}" for path in sorted((PACKAGE / "models").glob("*.py"))
             for mention in _method_mentions(path.read_text(encoding="utf-8"), names)]
    assert not found, "soup/models/ names soup methods (declare a method's fields beside it in soup/cook): " + \
        "; ".join(found)


# Tests live by the stage they test (tests/<stage>/), beside the entry points' (cli/), the package's own shape
# and docs (package/) and the benchmark scripts' (benchmarks/): a newcomer finds a stage's tests by its name.
TEST_FOLDERS = set(STAGES) | {"cli", "package", "benchmarks"}


def test_tests_are_arranged_by_stage():
    tests = ROOT / "tests"
    misplaced = [str(p.relative_to(ROOT)) for p in sorted(tests.rglob("test_*.py"))
                 if p.parent == tests or p.parent.name not in TEST_FOLDERS or p.parent.parent != tests]
    assert not misplaced, "tests outside tests/<stage>/: " + ", ".join(misplaced)
