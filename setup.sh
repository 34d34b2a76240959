#!/usr/bin/env bash
# Install privmed into ./.venv and run the demo. Safe to run again.
#   bash setup.sh            install + demo
#   bash setup.sh --no-demo  install only
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first and pinned: the CPU build. Left to the resolver, torch comes as a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
if [ "${1:-}" != "--no-demo" ]; then
  .venv/bin/privmed demo
fi
