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
PLAIN_MODULES = ("planning", "planning.inventory", "planning.chunks", "planning.capacity", "planning.counts",
                 "planning.activations", "planning.memory", "planning.parallel_check", "planning.layout",
                 "checkpoints", "checkpoints.names", "checkpoints.weight_map", "lora", "lora.config", "run",
                 "run.launcher", "evaluation", "evaluation.sandbox", "quantization", "quantization.settings", "dtypes",
                 "fileio", "errors")
# the subpackages, each named for what it holds (the README's map says the same)
SUBPACKAGES = ("checkpoints", "evaluation", "lora", "planning", "quantization", "run")
# what stays at the top, as upstream packages keep it: the model, its config, tokenizer and the upstream tools
TOP_MODULES = ("code_alpaca_preprocess", "convert_weight", "deepseek2", "deepseek2_config", "deepseek2_tokenizer",
               "dtypes", "errors", "fileio", "layers", "mla", "moe", "rope", "train_tokenizer")


def _modules():
    """Dotted names of the package's modules relative to it ('mla', 'checkpoints.load'; a subpackage's __init__ is
    the subpackage's name)."""
    found = []
    for folder, _, files in os.walk(PKG):
        rel = os.path.relpath(folder, PKG)
        prefix = "" if rel == "." else rel.replace(os.sep, ".") + "."
        for name in files:
            if name.endswith(".py"):
                module = prefix + name[:-3]
                if module != "__init__":
                    found.append(module[:-len(".__init__")] if module.endswith(".__init__") else module)
    return sorted(found)


def _path(module: str) -> str:
    path = os.path.join(PKG, *module.split("."))
    return os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"


def _tree(module: str):
    with open(_path(module), encoding="utf-8") as handle:
        return ast.parse(handle.read())


def _imports(module: str) -> set:
    """Package modules that ``module`` imports anywhere in its body (top level or inside functions)."""
    modules = set(_modules())
    found = set()
    for node in ast.walk(_tree(module)):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
            rest = node.module[len(PACKAGE):].lstrip(".")
            names = [f"{rest}.{alias.name}" if rest else alias.name for alias in node.names] + [rest]
        elif isinstance(node, ast.Import):
            names = [alias.name[len(PACKAGE) + 1:] for alias in node.names if alias.name.startswith(PACKAGE + ".")]
        for name in names:
            while name and name not in modules:              # an imported name resolves to its module
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found - {module}


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
    assert "run.predict" in _imports("run.runner") and "checkpoints.rank_slices" in _imports("run.predict")


def test_one_import_style_inside_the_package():
    """Absolute imports only (``from research.deepseek2.x import y``): the upstream scripts run as files
    (``python convert_weight.py``), where a relative import fails."""
    relative = [module for module in _modules()
                for node in ast.walk(_tree(module)) if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, f"relative imports in {sorted(set(relative))}"


def test_rooms_by_concept():
    """The top holds the model and the upstream tools; everything else is in a subpackage named for what it holds."""
    top = sorted(m for m in _modules() if "." not in m and m not in SUBPACKAGES)
    assert top == sorted(TOP_MODULES)
    assert sorted(m for m in _modules() if "." not in m and m in SUBPACKAGES) == sorted(SUBPACKAGES)
    for name in ("finetune_deepseek2_236B.yaml", "run_train_deepseek2_236B.yaml", "run_predict_deepseek2_236B.yaml"):
        assert os.path.isfile(os.path.join(PKG, name)), name          # where the upstream README's commands look


@pytest.mark.parametrize("module", _modules())
def test_no_module_over_600_lines(module):
    with open(_path(module), encoding="utf-8") as handle:
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
    import reference as R
    from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
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
