#!/usr/bin/env bash
# Installs what bdscan needs into the project (idempotent): a Python virtualenv in .venv
# with the torch==2.13.0 wheel from PyPI, whose torch/ folder is the libtorch that tch
# 0.26 links against, plus numpy and safetensors for the fixture scripts and checks.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
if .venv/bin/python -c "import sys, torch, numpy, safetensors; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
    exit 0
fi
echo "setup: installing torch==$TORCH_VERSION (libtorch) into .venv — a few minutes on first run" >&2
python3 -m venv .venv
.venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check "torch==$TORCH_VERSION" numpy safetensors
