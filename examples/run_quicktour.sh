#!/usr/bin/env bash
# The quicktour from nothing: a virtual environment in .venv (reused when present), PyTorch
# installed first and pinned, then optimum-disc with its quicktour extra, then
# examples/quicktour.py with the arguments given here (see `--help`).
#
#   bash examples/run_quicktour.sh                 # from the repository root, or from anywhere
#   bash examples/run_quicktour.sh --slice 64 --output out/quicktour
#
# Environment: PYTHON (default python3, 3.10 or newer), VENV (default <repo>/.venv),
# TORCH_REQUIREMENT (default torch==2.13.0: pinned, so that pip takes that build rather than the
# newest one, which may pull several GB of CUDA packages onto a CPU-only machine).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
TORCH_REQUIREMENT="${TORCH_REQUIREMENT:-torch==2.13.0}"
EXTRAS="quicktour,evaluation"

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "run_quicktour.sh: optimum-disc needs Python 3.10 or newer; set PYTHON=python3.11" >&2
    exit 1
}
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# Install only when something changed since the last set-up (pyproject.toml, torch's pin, extras).
stamp="$VENV/.optimum-disc-setup"
want="$(cat "$ROOT/pyproject.toml" - <<<"$TORCH_REQUIREMENT $EXTRAS" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] \
    || ! "$VENV/bin/python" -c 'import optimum_disc' 2>/dev/null; then
    echo "== installing $TORCH_REQUIREMENT, then optimum-disc[$EXTRAS] (a few minutes the first time)"
    "$VENV/bin/python" -m pip install -q "$TORCH_REQUIREMENT"
    "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
    echo "$want" >"$stamp"
fi
# The script's own folder, not the repository root, goes first on sys.path: the root's kernels/
# folder would otherwise be taken for the Hub's `kernels` package by transformers.
exec "$VENV/bin/python" "$ROOT/examples/quicktour.py" "$@"
