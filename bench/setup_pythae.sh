#!/usr/bin/env bash
# Create the separate benchmark venv holding pythae (NOT a dependency of iwae).
#   bash bench/setup_pythae.sh [PYTHON]      -> bench/.venv-pythae
# torch is pinned to 2.13.0 so that pip takes the same CPU build as iwae's venv
# (a plain `pip install pythae` may pull a multi-GB CUDA build).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${1:-python3}"
venv="$here/.venv-pythae"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --upgrade pip >/dev/null
"$venv/bin/python" -m pip install "torch==2.13.0" pythae
"$venv/bin/python" -c "import importlib.metadata as m, torch; print('pythae', m.version('pythae'), 'torch', torch.__version__)"
