#!/usr/bin/env bash
# Mutation check of the core pure modules (minutes, not part of CI): see bench/mutation.py for what it does.
#   bench/mutation.sh                                   every module in bench/mutation.py's MODULES
#   bench/mutation.sh vilbert/answers.py                one of them
#   bench/mutation.sh service/inputs.py=tests/test_inputs.py --max-children 1
# Writes the score table to stdout and var/mutation/mutation-table.md; exits 1 on an unexplained survivor.
set -euo pipefail
cd "$(dirname "$0")/.."
make --quiet install
exec .venv/bin/python bench/mutation.py "$@"
