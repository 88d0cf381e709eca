#!/usr/bin/env bash
# Installs the project with its test dependencies and runs the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k parity
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"

python -m pytest -q "$@"
