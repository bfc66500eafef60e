#!/usr/bin/env bash
# The test command: set up (idempotent, into .venv), then run the whole suite on CPU in two worker processes, the 30
# slowest tests listed at the end. Extra arguments go to pytest: -m "not slow" is the everyday loop (under 5 minutes),
# a file or -k selects tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source scripts/env.sh
export LOCAL_DEFAULT_PATH="${LOCAL_DEFAULT_PATH:-$(mktemp -d)/logs}"   # keep MindFormers' logs out of the tree
exec "$DS2_PYTHON" -m pytest -q -n 2 --dist loadgroup --durations=30 tests "$@"
