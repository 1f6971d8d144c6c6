#!/usr/bin/env bash
# Sets up the environment, then runs the test suite (slow/benchmark-marked tests are off by default;
# pass `-m slow` to run them). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
