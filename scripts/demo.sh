#!/usr/bin/env bash
# The main job on a fresh machine: set up (into .venv), then tokenizer -> tiny DeepSeek-V2 -> code_alpaca ->
# finetune -> predict. Extra arguments go to scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source scripts/env.sh
exec "$DS2_PYTHON" scripts/demo.py "$@"
