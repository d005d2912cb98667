#!/usr/bin/env bash
# Move the pins in constraints.txt: install the newest releases that pyproject.toml allows into a fresh
# virtualenv, run the test suite there, and only if it passes write that virtualenv's versions back.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python -m venv "$venv"
"$venv/bin/pip" install --quiet torch==2.13.0 -e ".[test]"
"$venv/bin/python" -m pytest -q
{
    sed -n '1,/^[^#]/{/^#/p}' constraints.txt
    "$venv/bin/pip" freeze --exclude-editable | grep -v -e '^torch==' -e '^prmserve'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt updated from $venv; review 'git diff constraints.txt' and commit it"
