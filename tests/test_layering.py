"""lgff_core is the bottom layer: importing any of its modules never imports `pipelines` or `components`."""
import subprocess
import sys
from pathlib import Path

import pytest

import lgff_core

CHECK = """
import importlib, pkgutil, sys
import lgff_core
names = [m.name for m in pkgutil.walk_packages(lgff_core.__path__, "lgff_core.")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
from lgff_core.cli import build_parser
build_parser()  # every sub-command registered, including `lgff pipeline` / `lgff demo`
from lgff_core.kfp.pipeline import pipeline_names
pipeline_names()
above = sorted(m for m in sys.modules if m.split(".")[0] in ("pipelines", "components"))
print(len(names), above)
"""


@pytest.mark.slow  # imports torch, timm, faiss and kfp in a fresh interpreter
def test_lgff_core_never_imports_pipelines_or_components():
    root = Path(lgff_core.__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=root, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    count, above = out.stdout.split(" ", 1)
    assert int(count) > 40 and above.strip() == "[]"


def test_pipelines_register_with_lgff_core():
    import pipelines
    from lgff_core.kfp.pipeline import pipeline_names, registered_pipelines

    assert set(pipelines.PIPELINES) <= set(pipeline_names())
    assert registered_pipelines()["reindex"] is pipelines.PIPELINES["reindex"]


def _lgff_import_graph() -> dict:
    """Module -> the lgff_core modules it imports, from the source (every import statement, also inside functions:
    a deferred import that only hides a cycle is still a cycle)."""
    import ast

    root = Path(lgff_core.__file__).resolve().parent.parent
    modules = {}
    for path in (root / "lgff_core").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {}
    for name, (path, is_package) in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # `from pkg import module` imports the module
                    deps.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = sorted(d for d in deps if d in modules and d != name)
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter[0]; counter[0] += 1; stack.append(start); on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]; counter[0] += 1; stack.append(nxt); on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop(); on_stack.discard(member); component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_lgff_core_has_no_import_cycles():
    graph = _lgff_import_graph()
    assert len(graph) > 40 and "lgff_core.kfp.pipeline" in graph
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


# docs/architecture.md's layer table, bottom first: a module imports only its own layer and the ones listed before it
# (a dotted entry is a module that sits lower than the rest of its package: the pure metric functions, which the
# trainer's validation uses)
LAYERS = ["errors", "config", "storage", "memory", "device", "data", "evaluate.metrics", "models", "train", "index",
          "retrieval", "evaluate", "kfp", "cli", "__main__"]
# the component runtime's job is to run an `lgff` command inside a pod: it calls the CLI's entry point
ALLOWED_UPWARD = {("lgff_core.kfp.runtime", "lgff_core.cli")}


def _layer(module: str) -> int:
    name = module.split(".", 1)[1] if "." in module else ""
    matches = [i for i, layer in enumerate(LAYERS) if name == layer or name.startswith(layer + ".")]
    return max(matches, key=lambda i: len(LAYERS[i])) if matches else -1


def test_lgff_core_layers_import_only_downwards():
    upward = [(a, d) for a, deps in _lgff_import_graph().items() for d in deps
              if _layer(d) > _layer(a) and (a, d) not in ALLOWED_UPWARD]
    assert upward == []
