#!/usr/bin/env bash
# The device check: compiled runs of three stacks, `pgolf bench --reference` for baseline and pr400 (100 steps),
# peak memory; rows into docs/performance.md. At most 8 minutes on one GPU.
#
#   tools/gpu_check.sh [--out DIR] [--baseline-ref SCRIPT] [--pr400-ref SCRIPT] [--data DIR --tokenizer FILE]
#   tools/gpu_check.sh --cpu-dry-run [--out DIR] [--baseline-ref SCRIPT] [--pr400-ref SCRIPT]
#
# PYTHON (default python3) is the interpreter that has pgolf installed. What each check does, the budget and
# the outputs: tools/gpu_check.py; how to prepare a lent machine: docs/performance.md, "Device check".
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
