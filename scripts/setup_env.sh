#!/usr/bin/env bash
# Installs everything the project needs on a fresh machine (CPU): pinned requirements, then this package in
# editable mode. Re-running is cheap (pip only checks). Usage: bash scripts/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
echo "setup: installing requirements (first time about 2 minutes: mindspore is a 2.5 GB install)"
"$PY" -m pip install --disable-pip-version-check -q -r requirements-test.txt
"$PY" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
echo "setup: done"
