#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment in .venv with yolact-d2 and its dependencies.
#   bash scripts/setup.sh && .venv/bin/python tools/main_job.py
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
PYTHON=.venv/bin/python bash scripts/install.sh
