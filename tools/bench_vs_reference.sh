#!/usr/bin/env bash
# Side-by-side throughput of a pgolf stack and its reference train_gpt.py on the same shards and steps.
#
#   tools/bench_vs_reference.sh STACK REFERENCE_SCRIPT DATA_DIR TOKENIZER [STEPS]
#
# Both runs use a fixed iteration count (MAX_WALLCLOCK_SECONDS=0), no periodic validation, and the same
# environment (the stack is driven through --legacy-env with the variables below). Prints each run's
# step_avg at the last logged step, its final loss, and the ratio pgolf / reference.
set -euo pipefail
stack=$1; ref=$2; data=$3; tok=$4; steps=${5:-200}
nproc=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
export DATA_PATH=$data TOKENIZER_PATH=$tok ITERATIONS=$steps MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 \
       TRAIN_LOG_EVERY=$steps WARMUP_STEPS=${WARMUP_STEPS:-20} SEED=${SEED:-1337}
out=$(mktemp -d)
(cd "$out" && RUN_ID=reference torchrun --standalone --nproc_per_node="$nproc" "$(realpath "$ref")" > reference.txt 2>&1)
pgolf run "$stack" --legacy-env --nproc-per-node "$nproc" --run-id pgolf --out-dir "$out/runs" > "$out/pgolf.txt" 2>&1
python - "$out/reference.txt" "$out/runs/pgolf/log.txt" <<'PY'
import sys
from pgolf_core.logparse import parse_log
ref, ours = (parse_log(open(p).read()) for p in sys.argv[1:3])
rows = []
for name, log in (("reference", ref), ("pgolf", ours)):
    step = max(log["step_avg_ms"])
    rows.append((name, step, log["step_avg_ms"][step], log["train_loss"][step]))
    print(f"{name:<10} step:{step} step_avg:{rows[-1][2]:.2f}ms train_loss:{rows[-1][3]:.4f}")
print(f"ratio pgolf/reference: {rows[1][2] / rows[0][2]:.3f}")
PY
echo "logs in $out"
