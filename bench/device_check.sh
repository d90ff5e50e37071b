#!/usr/bin/env bash
# The GPU machine's checks, after `source bench/device_env.sh` and a cuda-hopper build: hook and
# collection tests on CUDA, cache-mode token equality against stock all-on-GPU, collection cost,
# compute-sanitizer on a short cached run. Logs and result JSON go to $OUT.
set -u
export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | head -1)
echo "library: $EDGE_PREATTN_LIB"
python3 -m pytest -q -p no:cacheprovider tests/test_hooks.py tests/test_collect.py tests/test_build.py 2>&1 \
    | tee "$OUT/pytest-gpu.log" | tail -5
python3 bench/cache_equivalence.py /tmp/moe-ref-a.gguf -n 64 --slots 16,64 --out "$OUT" 2>&1 | tee "$OUT/equivalence.log" | tail -12
python3 bench/collect_overhead.py /tmp/moe-ref-a.gguf .carry/train.txt --prompts-limit 32 --out "$OUT" 2>&1 | tail -4
compute-sanitizer --tool memcheck --print-limit 20 python3 -m edge_preattn.cli run -m /tmp/moe-ref-a.gguf \
    --mode lru --slots 16 -n 8 > "$OUT/memcheck.log" 2>&1
echo "memcheck exit $?"; grep -E "ERROR SUMMARY|Invalid" "$OUT/memcheck.log" | head -5
for mode in off lru oracle; do
    python3 -m edge_preattn.cli run -m /tmp/moe-ref-a.gguf --mode $mode --slots 16 --temp 0 -n 128 --stats-json "$OUT/run-$mode.json" \
        2>&1 | tail -3
done
