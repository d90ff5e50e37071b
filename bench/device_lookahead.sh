#!/usr/bin/env bash
# One device call (session 3, after the lookahead commit): does lookahead make prediction pay on the GPU?
# The packaged model at 8 of 32 slots, 256 greedy tokens per run, each mode in its own process, twice.
#   carry .carry/whl .carry/llama-src.tgz ; source bench/device_env.sh first
set -u
python3 -m edge_preattn.cli build --preset cuda-hopper 2>&1 | tail -1
export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
P=edge_preattn/onnx_models/edge-moe-default
for round in 1 2; do
  for config in "lru" "exact" "exact --lookahead 1" "exact --lookahead 2" "top1 --lookahead 1" "exact --wait-prefetch"; do
    name=$(echo "$config" | tr ' ' '_')
    python3 -m edge_preattn.cli run --mode $config --predictors $P --slots 8 --temp 0 -n 256 -t 8 \
        -p "def quicksort(items):" --stats-json "$OUT/run-$name-$round.json" > /dev/null 2>&1 || echo "$config failed"
  done
done
python3 - <<'PY'
import glob, json, os
rows = {}
for path in sorted(glob.glob(os.environ["OUT"] + "/run-*.json")):
    d = json.load(open(path))
    name = os.path.basename(path)[4:-7]
    rows.setdefault(name, []).append(d)
keys = ["decode_tok_s", "hit_rate", "misses_per_token", "prefetch_hits", "prefetch_late", "lookahead_predictions"]
for name, runs in rows.items():
    print(name, {k: [r.get(k) for r in runs] for k in keys})
PY
(cd "$OUT" && tar czf /tmp/la.tgz . && find . -mindepth 1 -delete && mv /tmp/la.tgz "$OUT/lookahead-gpu.tgz")
