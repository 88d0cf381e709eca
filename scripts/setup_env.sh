# Sourced by the other scripts: creates .venv on first use, installs the
# project (and its test extras) into it, and puts it first on PATH.
# PYTHON picks the interpreter (default python3, 3.11 or newer).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ADAFACE_VENV:-$REPO_ROOT/.venv}"
STAMP="$VENV/.installed"

if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating $VENV" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$REPO_ROOT/pyproject.toml" -nt "$STAMP" ]; then
  echo "Installing adaface-jax and its test dependencies into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$REPO_ROOT[test]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$REPO_ROOT"
