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
    python_requires=">=3.9,<3.12",
    packages=find_packages(include=["research", "research.*"]),
    package_data={"research.deepseek2": ["*.yaml"]},
    py_modules=["run_mindformer"],
    install_requires=_requirements("requirements.txt"),
    extras_require={"test": _requirements("requirements-test.txt")},
    entry_points={"console_scripts": ["deepseek2-run=run_mindformer:main"]},
    license="Apache-2.0",
)
