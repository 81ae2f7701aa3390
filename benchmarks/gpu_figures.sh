#!/usr/bin/env bash
# Issue 17's GPU figures in one go, for a session lent one GPU: Mini-Omni's `final` shape with random
# weights, bf16, ZeRO-2, one process; before (8 rows of 565 positions, padded, sdpa) and after (the
# micro-batch the memory estimate chooses; packed; compiled). Each configuration appends one JSON
# line to $OUT/figures.jsonl and keeps its log; a table of them is printed at the end.
#
#     OUT=/tmp/figures bash benchmarks/gpu_figures.sh      # about 5 minutes on an H100/H200
set -u
OUT=${OUT:-figures}
mkdir -p "$OUT"
run() {
  local name=$1
  shift
  timeout 170 accelerate launch --use_deepspeed --deepspeed_config_file ds_configs/zero2.json \
    --num_processes 1 --mixed_precision bf16 benchmarks/stage_steps.py --stage final \
    --json "$OUT/figures.jsonl" "$@" >"$OUT/$name.log" 2>&1 || echo "$name: failed or timed out (see $OUT/$name.log)"
}
run before
run auto --batch-size auto
run auto_packed --batch-size auto --packed
run auto_packed_compiled --batch-size auto --packed --compile inductor
python - "$OUT/figures.jsonl" <<'PY'
import json, sys
print(f"{'batch':>6} {'packed':>6} {'compile':>8} {'positions/s':>12} {'MFU':>6} {'peak GiB':>9} {'estimate':>9}")
for f in map(json.loads, open(sys.argv[1])):
    mfu = f"{f['mfu']:.1%}" if f.get("mfu") is not None else "-"
    print(f"{f['batch_per_process']:>6} {str(f['packed']):>6} {str(f['compile']):>8} "
          f"{f['tokens_per_second_per_process']:>12,.0f} {mfu:>6} {f['peak_memory_gib'] or 0:>9.1f} "
          f"{f['estimated_peak_gib']:>9.1f}")
PY
