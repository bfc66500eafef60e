"""DeepSeek-V2 for MindSpore / MindFormers: `pip install -e .` (add `[test]` for the reference and pytest)."""
import os

from setuptools import setup, find_packages

HERE = os.path.dirname(os.path.abspath(__file__))


def _requirements(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as handle:
        return [line.split("#")[0].strip() for line in handle
                if line.split("#")[0].strip() and not line.startswith("-r")]


setup(
    name="deepseek2-mindspore",
    version="0.1.0",
    description="DeepSeek-V2 (MLA + DeepSeekMoE) in MindSpore, registered in MindFormers",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",          # tested with 3.11 (mindspore 2.9 + mindformers 1.9 wheels)
    packages=find_packages(include=["research", "research.*"]),
    package_data={"research.deepseek2": ["*.yaml", "deepseek2_lite/*.yaml"]},
    py_modules=["run_mindformer"],
    install_requires=_requirements("requirements.txt"),
    extras_require={"test": _requirements("requirements-test.txt")},
    # the upstream commands (`python research/deepseek2/convert_weight.py ...`) keep working; these are the same
    # programs on PATH once the package is installed
    entry_points={"console_scripts": [
        "deepseek2-run=run_mindformer:main",
        "deepseek2-convert=research.deepseek2.convert_weight:main",
        "deepseek2-preprocess=research.deepseek2.code_alpaca_preprocess:main",
        "deepseek2-train-tokenizer=research.deepseek2.train_tokenizer:main",
        "deepseek2-evaluate=research.deepseek2.evaluation.heldout:main",
        "deepseek2-humaneval=research.deepseek2.evaluation.humaneval:main",
        "deepseek2-humaneval-check=research.deepseek2.evaluation.humaneval:check_main",
        "deepseek2-lm-eval=research.deepseek2.evaluation.lm_eval_model:main",
        "deepseek2-plan-memory=research.deepseek2.planning.memory:main",
        "deepseek2-parallel-check=research.deepseek2.planning.parallel_check:main",
    ]},
    license="Apache-2.0",
)
