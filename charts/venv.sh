#!/usr/bin/env bash
# Creates (once) and updates the virtualenv of the chart and docs tests and of charts/render.py
# under $HOME/.cache/dbportal/venv (DBPORTAL_VENV overrides), with the pinned packages of
# charts/requirements.txt from PyPI, and prints the path of its python:
#
#   python=$(bash charts/venv.sh) && "$python" charts/render.py --set replicas=1
#
# Needs python3 and Debian's python3-venv.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd -P)
venv=${DBPORTAL_VENV:-$HOME/.cache/dbportal/venv}
if [[ ! -x $venv/bin/python ]]; then
    python3 -m venv "$venv" >&2
fi
# pip answers at once when every pinned version is installed already.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$here/requirements.txt" >&2
echo "$venv/bin/python"
