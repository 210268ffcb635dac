# Sourced by the Makefile and scripts: points tch's build at the libtorch inside .venv.
LIBTORCH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && .venv/bin/python -c 'import os, torch; print(os.path.relpath(os.path.dirname(torch.__file__)))')"
export LIBTORCH
