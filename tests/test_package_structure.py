"""The package's structure, as promised in the README's map: no import cycle (function-local imports included), no
module over 600 lines, plain-Python modules that import no MindSpore, and a model constructor without side effects."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "research", "deepseek2")
PACKAGE = "research.deepseek2"
PLAIN_MODULES = ("inventory", "weight_map", "plan_memory", "parallel_check", "dtypes", "fileio", "errors")


def _modules():
    return sorted(name[:-3] for name in os.listdir(PKG) if name.endswith(".py") and name != "__init__.py")


def _imports(module: str) -> set:
    """Package modules that ``module`` imports anywhere in its body (top level or inside functions)."""
    with open(os.path.join(PKG, module + ".py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:                                    # from .x import y / from . import x
                base = node.module.split(".")[0] if node.module else None
                found.update([base] if base else [alias.name for alias in node.names])
            elif node.module and node.module.startswith(PACKAGE):
                rest = node.module[len(PACKAGE):].lstrip(".")
                found.update([rest.split(".")[0]] if rest else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    found.add(alias.name[len(PACKAGE) + 1:].split(".")[0])
    return {name for name in found if name in _modules() and name != module}


def test_no_import_cycle_inside_the_package():
    graph = {module: _imports(module) for module in _modules()}
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_detector_sees_function_local_imports():
    assert "predict" in _imports("runner") and "parallel" in _imports("predict")


@pytest.mark.parametrize("module", _modules())
def test_no_module_over_600_lines(module):
    with open(os.path.join(PKG, module + ".py"), encoding="utf-8") as handle:
        assert sum(1 for _ in handle) <= 600


def test_plain_python_modules_import_without_mindspore():
    code = (f"import sys\nfor m in {PLAIN_MODULES!r}:\n    __import__('{PACKAGE}.' + m)\n"
            "import research.deepseek2 as p\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('mindspore', 'mindformers', 'torch')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_model_constructor_reads_no_checkpoint_and_lays_out_nothing(tmp_path):
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM, reference as R
    missing = str(tmp_path / "no_such.ckpt")
    net = DeepseekV2ForCausalLM(DeepseekV2Config(**R.LITE_STYLE, seq_length=8, checkpoint_name_or_path=missing))
    assert not os.path.exists(missing)
    strategies = [getattr(cell.matmul, "in_strategy", None) for _, cell in net.cells_and_names()
                  if hasattr(cell, "matmul")]
    assert strategies and all(s is None for s in strategies)
    names = {p.name for p in net.get_parameters()}
    assert not any("aux_loss" in n for n in names)                  # no side channel held by the model


def test_console_scripts_point_at_mains():
    """Every console script of setup.py names a module and a callable main (the upstream script forms are tested
    with each tool)."""
    import importlib
    import re
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as handle:
        entries = re.findall(r'"(deepseek2-[\w-]+)=([\w.]+):(\w+)"', handle.read())
    assert len(entries) >= 6
    for _, module, function in entries:
        assert callable(getattr(importlib.import_module(module), function))
