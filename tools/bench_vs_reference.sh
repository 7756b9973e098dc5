#!/usr/bin/env bash
# Side-by-side throughput of a pgolf stack and its reference train_gpt.py on the same shards and steps.
#
#   tools/bench_vs_reference.sh STACK REFERENCE_SCRIPT DATA_DIR TOKENIZER [STEPS] [-- EXTRA pgolf bench ARGS]
#
# A thin wrapper kept for the old call form; everything happens in `pgolf bench --reference` (fixed iteration
# count, no wallclock cap, no periodic validation, the stack's environment from `pgolf config --as-env`,
# step_avg / tokens/s / peak memory of both and the ratio pgolf/reference). NPROC (default 1) processes.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi
stack=$1; ref=$2; data=$3; tok=$4; shift 4
steps=200
if [ $# -gt 0 ] && [ "$1" != "--" ]; then steps=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
exec pgolf bench "$stack" --steps "$steps" --nproc-per-node "${NPROC:-1}" --reference "$ref" \
  --set "data.path=\"$data\"" --set "data.tokenizer=\"$tok\"" "$@"
