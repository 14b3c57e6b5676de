#!/usr/bin/env bash
# Build the documentation with every warning an error.
#
#   bash .ci/docs.sh [OUTDIR]      (default OUTDIR: docs/_build/html)
#
# Installs the `docs` extra into the active Python environment, then runs sphinx-build with
# -W --keep-going (all warnings reported, exit status 1 if there was any). docs/conf.py also
# turns Python warnings raised during the build (numpydoc's docstring checks) into Sphinx
# warnings, runs in nitpicky mode (every cross-reference must resolve) and fails when a
# name of xlstm.__all__ is missing from the API reference. Nothing is generated into docs/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out="${1:-docs/_build/html}"
python -m pip install --quiet '.[docs]'

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
start=$(date +%s)
status=0
python -m sphinx -W --keep-going -E -b html docs "$out" 2>&1 | tee "$log" || status=$?
# Belt and braces: anything that looks like a warning fails the build, even if it
# reached the output some other way.
if grep -E -q "WARNING|Warning:" "$log"; then
    echo "docs: warnings in the build output (see above)" >&2
    status=1
fi
echo "docs: sphinx-build exit status $status, $(( $(date +%s) - start )) s, output in $out"
exit "$status"
