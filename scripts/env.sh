# Sourced by setup_env.sh, test.sh and demo.sh: the project's interpreter (DS2_PYTHON) and PATH with its
# virtual environment first, so that msrun and its workers (which start `python` from PATH) use it too.
_ds2_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${DS2_VENV:-.venv}" = "none" ]; then
  DS2_VENV_DIR=""
  DS2_PYTHON="$(command -v "${PYTHON:-python3}")"
else
  case "${DS2_VENV:-.venv}" in
    /*) DS2_VENV_DIR="${DS2_VENV}" ;;
    *) DS2_VENV_DIR="$_ds2_root/${DS2_VENV:-.venv}" ;;
  esac
  DS2_PYTHON="$DS2_VENV_DIR/bin/python"
  export VIRTUAL_ENV="$DS2_VENV_DIR"
  export PATH="$DS2_VENV_DIR/bin:$PATH"
fi
export DS2_PYTHON
