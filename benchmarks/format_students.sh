#!/bin/bash
# The demo students on a v1 cache and on its `logitcache convert`ed v2 copy: one row per loss, final
# train loss of each, the largest difference over the loss curve, held-out LM loss of each.
#
#   benchmarks/format_students.sh DEMO_OUT WORK
#
# DEMO_OUT: a `make demo` output folder of a logitcache before format v2 (cache-topk, cache-sample in v1).
set -euo pipefail
DEMO_OUT=$1
WORK=$2
PY=${PYTHON:-python3}
rm -rf "$WORK" && mkdir -p "$WORK"
for m in topk sample; do
  cp -r "$DEMO_OUT/cache-$m" "$WORK/v1-$m"
  $PY -m logitcache convert "$WORK/v1-$m" "$WORK/v2-$m"
done
echo "| loss | steps | final train loss v1 | final train loss v2 | largest \|Δ\| over the curve | held-out LM loss v1 | held-out LM loss v2 |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for pair in sample:rs-kd topk:topk-renorm topk:topk-ghost topk:bild topk:rlkd; do
  m=${pair%%:*}; loss=${pair##*:}
  for v in v1 v2; do
    $PY -m logitcache train --cache "$WORK/$v-$m" --loss "$loss" --out "$WORK/$v-$m-$loss" --student nano --steps 60 \
        --batch-size 16 --lr 3e-3 --warmup-steps 20 --eval-every 60 --save-every 60 > /dev/null 2>&1
  done
  $PY - "$WORK/v1-$m-$loss/metrics.jsonl" "$WORK/v2-$m-$loss/metrics.jsonl" "$loss" <<'PYEOF'
import json
import sys

def load(path):
    rows = [json.loads(line) for line in open(path)]
    return [r["loss"] for r in rows if r["kind"] == "train"], [r for r in rows if r["kind"] == "eval"][-1]

a, eval_a = load(sys.argv[1])
b, eval_b = load(sys.argv[2])
print(f"| {sys.argv[3]} | {len(a)} | {a[-1]:.6f} | {b[-1]:.6f} | {max(abs(x - y) for x, y in zip(a, b)):.2e} | "
      f"{eval_a['lm_loss']:.6f} | {eval_b['lm_loss']:.6f} |", flush=True)
PYEOF
done
