#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export LOCAL_DEFAULT_PATH="${LOCAL_DEFAULT_PATH:-$(mktemp -d)/logs}"   # keep MindFormers' logs out of the tree
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider tests "$@"
