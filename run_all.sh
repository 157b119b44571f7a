#!/usr/bin/env bash
# Runs the whole study: set-up if needed, the notebooks via papermill for each dataset and ratio, the analysis,
# the HTML report and the plots. Rerunning resumes: finished cells are skipped.
#   bash run_all.sh                      # the original study (pythia-70m, wikitext + PG-19 from the hub)
#   bash run_all.sh --preset offline     # bundled SmolLM2-135M, local text ($KVLIB_DATA_DIR or ../shared/data)
#   bash run_all.sh --preset smoke       # a tiny model through every step, about a minute
#   bash run_all.sh --preset offline --executor ray [--address HEAD:6379]   # notebooks as Ray tasks (README)
# It shows one progress display; the notebooks' output goes to <output>/logs/study-<time>.log (--verbose: shown too).
# At the end it prints the report's path and a one-line answer; `python -m kvlib report` rebuilds the report anytime.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || bash setup.sh
exec .venv/bin/python -m kvlib study "$@"
