#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite (tiny models; the real SmolLM2 and the smoke study too).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || bash setup.sh
exec .venv/bin/python -m pytest "$@"
