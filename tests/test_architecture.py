"""The package's shape: no import cycle among modules, layers pointing one way, no module over ~500 lines, and no
torch where none is needed (``import turbo_export``, an ONNX Runtime runner, the serving handlers)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "turbo_export")
MAX_LINES = 520
# Lower layers never import higher ones at module level (cli/serve -> evaluate -> export -> families -> patch/core).
LAYERS = {
    "errors": 0, "files": 0, "limits": 0, "logs": 0, "metrics": 0, "core": 1, "models": 1, "backends": 1, "patch": 2,
    "pipelines": 2, "families": 3, "api": 4, "export": 4, "evaluate": 5, "serve": 6, "cli": 7,
}


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                found[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return found


def _module_level_imports(path: str, modules: set[str]) -> set[str]:
    """turbo_export modules imported at module level (not inside functions, not under TYPE_CHECKING)."""
    tree = ast.parse(open(path).read())
    out: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("turbo_export"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    out.add(full if full in modules else node.module)

    visit(tree.body)
    return {m for m in out if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    names = set(modules)
    return {m: _module_level_imports(p, names) - {m} for m, p in modules.items()}


def test_no_import_cycle_among_modules():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def dfs(node, stack):
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                dfs(dep, stack + [dep])
        state[node] = 2

    for module in graph:
        if module not in state:
            dfs(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_dependencies_point_one_way():
    wrong = [(m, d) for m, deps in _graph().items() for d in deps
             if _layer(m) is not None and _layer(d) is not None and _layer(d) > _layer(m)]
    assert not wrong, f"lower layer imports a higher one: {wrong}"


def test_no_module_is_too_long():
    long = {m: n for m, p in _modules().items() if (n := sum(1 for _ in open(p))) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_only_family_modules_name_a_family():
    """The registry is the only way to a family: no other module compares against a family's name."""
    offenders = []
    for module, path in _modules().items():
        if module.startswith(("turbo_export.families", "turbo_export.patch")):
            continue
        text = open(path).read()
        offenders += [f"{module}: {n}" for n in ('== "vit"', '== "blip"', '== "sd-unet"', 'family == ', 'SPECS[')
                      if n in text]
    assert not offenders, offenders


@pytest.mark.parametrize("code", [
    "import turbo_export",
    "import turbo_export.cli",
    "from turbo_export.backends.ort import OnnxRuntimeRunner",
    "from turbo_export.serve import handlers",
    "from turbo_export.serve import triton_repo",
])
def test_no_torch_where_none_is_needed(code):
    probe = f"import sys; {code}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", f"{code} imports torch"


def test_every_declared_class_is_patched():
    from turbo_export.families import families
    from turbo_export.patch import ADAPTERS, unet

    for family in families():
        for name in family.model_classes:
            assert name in ADAPTERS or name == unet.UNET_CLASS, f"{family.name}: {name} has no patch"
