#!/usr/bin/env bash
# The test command: set up (idempotent, into .venv), then run the whole suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source scripts/env.sh
export LOCAL_DEFAULT_PATH="${LOCAL_DEFAULT_PATH:-$(mktemp -d)/logs}"   # keep MindFormers' logs out of the tree
exec "$DS2_PYTHON" -m pytest -q -p no:cacheprovider tests "$@"
