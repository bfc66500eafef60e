#!/usr/bin/env bash
# Installs everything the project needs on a fresh machine (CPU) into a virtual environment inside the project
# (.venv by default), never into the system interpreter: pinned requirements, then this package in editable mode.
# Re-running is cheap (pip only checks). Usage: bash scripts/setup_env.sh
#   DS2_VENV=DIR        use another virtual environment folder (created when missing)
#   DS2_VENV=none       install into the interpreter given by PYTHON (default python3) instead: your choice, not ours
# Prints nothing but progress; scripts/env.sh gives the interpreter to use afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
if [ "${DS2_VENV:-.venv}" != "none" ] && [ ! -x "$DS2_PYTHON" ]; then
  echo "setup: creating the virtual environment $DS2_VENV_DIR (the system Python is left as it is)"
  "${PYTHON:-python3}" -m venv "$DS2_VENV_DIR"
fi
echo "setup: installing requirements into $("$DS2_PYTHON" -c 'import sys; print(sys.prefix)') (first time about 3 minutes: mindspore is a 2.5 GB install)"
# pip warns once per package about index locations of this machine's pip.conf that do not exist; not ours to show
quiet_pip() { "$DS2_PYTHON" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
quiet_pip install --disable-pip-version-check -q -r requirements-test.txt
quiet_pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
echo "setup: done"
