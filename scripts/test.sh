#!/usr/bin/env bash
# The project's test command (README, .ci/run): the Rust core's tests, optimised, then the Python suite
# against the installed package. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release -p ferromerge-core
python -m pytest "$@"
