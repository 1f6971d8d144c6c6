"""The package's wings import only downward: engine <- integration <- face <- bench <- cli; the engine
knows nothing of transformers, PEFT or LLaMA-Factory; no module imports another that imports it back
(function-level imports included). Read from the source, so a lazy import counts as much as a top one."""

import ast
import subprocess
import sys
from pathlib import Path

import kt_sft

PACKAGE = Path(kt_sft.__file__).parent
THIRD_PARTY_ABOVE_ENGINE = ("transformers", "peft", "llamafactory")
# the face: tools a user or a script calls, which need the engine and nothing of the integration
FACE = {"kt_sft.environment", "kt_sft.fixtures", "kt_sft.memory_estimate", "kt_sft.recipes"}


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _is_module(name: str) -> bool:
    base = PACKAGE.parent / name.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """kt_sft modules and the third-party packages above the engine that `path` imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if node.module.startswith("kt_sft") and _is_module(full) else node.module)
        elif isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
    return {n for n in out if n.startswith("kt_sft") or n.split(".")[0] in THIRD_PARTY_ABOVE_ENGINE}


def _rank(name: str) -> int:
    if name.startswith(("kt_sft.engine", "kt_sft._kt_native")):
        return 0
    if name.startswith("kt_sft.integration") or name == "kt_sft.loading":  # kt_sft.loading: a re-export
        return 1
    if name in FACE:
        return 2
    if name.startswith("kt_sft.bench"):
        return 3
    return 4  # kt_sft.cli, kt_sft.__main__, and kt_sft itself (its __init__ only re-exports the engine)


GRAPH = {_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_wings_import_only_downward():
    upward = [f"{mod} -> {dep}" for mod, deps in GRAPH.items() if mod != "kt_sft"
              for dep in deps if dep.startswith("kt_sft") and _rank(dep) > _rank(mod)]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)
    assert GRAPH["kt_sft"] <= {n for n in GRAPH if n.startswith("kt_sft.engine")}


def test_engine_knows_no_model_integration():
    named = [f"{mod} -> {dep}" for mod, deps in GRAPH.items() if _rank(mod) == 0
             for dep in deps if not dep.startswith("kt_sft")]
    assert not named, named
    code = ("import sys, importlib, pkgutil, kt_sft.engine as e\n"
            "for m in pkgutil.iter_modules(e.__path__): importlib.import_module('kt_sft.engine.' + m.name)\n"
            f"print(sorted(p for p in {THIRD_PARTY_ABOVE_ENGINE!r} + ('kt_sft.integration', 'kt_sft.bench') "
            "if p in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_import_cycle():
    edges = {mod: {d for d in deps if d in GRAPH and d != mod} for mod, deps in GRAPH.items()}
    # a package's __init__ is imported on the way to any of its modules; that edge is no cycle
    edges = {mod: {d for d in deps if not mod.startswith(d + ".")} for mod, deps in edges.items()}
    done, stack = set(), []

    def visit(mod):
        if mod in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(mod):] + [mod]))
        if mod in done:
            return
        stack.append(mod)
        for dep in sorted(edges[mod]):
            visit(dep)
        stack.pop()
        done.add(mod)

    for mod in sorted(edges):
        visit(mod)
