#!/usr/bin/env bash
# Create (or reuse) the virtualenv that tests/compat runs the real mergekit in, isolated from ferromerge's own.
#   scripts/setup-mergekit-venv.sh [VENV_DIR]        (default: ~/.cache/ferromerge/mergekit-venv)
# Environment: PYTHON (interpreter to build the venv with, default python3), MERGEKIT_SPEC (default "mergekit==0.1.5"),
# PEFT_SPEC (default "peft==0.21.2").
# Idempotent: an existing venv whose mergekit imports is left alone. Prints the interpreter path at the end;
# tests/compat finds it there, or via FERROMERGE_MERGEKIT_PYTHON.
set -euo pipefail

VENV="${1:-${HOME}/.cache/ferromerge/mergekit-venv}"
PY="${PYTHON:-python3}"
# Pinned: docs/compat.md and the differential tests describe this release.
SPEC="${MERGEKIT_SPEC:-mergekit==0.1.5}"
# PEFT (a dependency of mergekit) is the peer of tests/compat/test_peft.py: pinned to the release it was checked with.
PEFT_SPEC="${PEFT_SPEC:-peft==0.21.2}"

if [[ -x "${VENV}/bin/python" ]] && "${VENV}/bin/python" -c "import mergekit.scripts.run_yaml, peft.utils.merge_utils" 2>/dev/null; then
    echo "mergekit already installed: $("${VENV}/bin/python" -m pip show mergekit 2>/dev/null | sed -n 's/^Version: //p')"
else
    mkdir -p "$(dirname "${VENV}")"
    [[ -x "${VENV}/bin/python" ]] || "${PY}" -m venv "${VENV}"
    "${VENV}/bin/python" -m pip install --upgrade pip
    # mergekit pulls torch; CPU wheels are enough for the tests
    "${VENV}/bin/python" -m pip install "${SPEC}" "${PEFT_SPEC}"
    "${VENV}/bin/python" -c "import mergekit.scripts.run_yaml, peft.utils.merge_utils"
fi

echo "mergekit venv: ${VENV}"
echo "export FERROMERGE_MERGEKIT_PYTHON=${VENV}/bin/python"
