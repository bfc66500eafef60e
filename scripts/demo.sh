#!/usr/bin/env bash
# The main job on a fresh machine: set up, then tokenizer -> tiny DeepSeek-V2 -> code_alpaca -> finetune -> predict.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${PYTHON:-python3}" scripts/demo.py "$@"
