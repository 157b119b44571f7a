#!/usr/bin/env bash
# notebooks/*.ipynb enter git without outputs: nbstripout as a git clean filter (results/notebooks/ keep theirs).
# Run from the repository root, with .venv in it (setup.sh does; tests/test_browser.py does in a scratch repository).
set -euo pipefail
git rev-parse --git-dir >/dev/null 2>&1 || exit 0  # not a git checkout: nothing to protect
git config filter.nbstripout.clean "'$PWD/.venv/bin/python' -m nbstripout --keep-id"
git config filter.nbstripout.smudge cat
attributes=$(git rev-parse --git-path info/attributes)
mkdir -p "$(dirname "$attributes")"  # a clone may come without .git/info (CI's does)
grep -qxF 'notebooks/*.ipynb filter=nbstripout' "$attributes" 2>/dev/null || echo 'notebooks/*.ipynb filter=nbstripout' >> "$attributes"
