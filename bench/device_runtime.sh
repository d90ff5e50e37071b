#!/usr/bin/env bash
# GPU-machine measurements of the expert cache, after `source bench/device_env.sh` and a cuda-hopper
# build. Step "equivalence": greedy tokens of every mode against stock all-on-GPU, for moe-ref-a and a
# 4-layer synthetic qwen3-30b-a3b. Step "modes PREDICTORS_DIR": per-mode speed and cache behaviour of
# moe-ref-a with trained predictors. Results go to $OUT.
set -u
export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
case "$1" in
equivalence)
    python3 -m edge_preattn.cli synth --preset qwen3-30b-a3b --layers 4 --type q4_0 -o /tmp/q3-4l.gguf 2>&1 | tail -1
    python3 bench/cache_equivalence.py /tmp/q3-4l.gguf -n 64 --slots 8,32 --out "$OUT" 2>&1 | tail -10
    python3 bench/cache_equivalence.py /tmp/moe-ref-a.gguf -n 64 --slots 16,64 --out "$OUT" 2>&1 | tail -10
    python3 bench/runtime_modes.py /tmp/q3-4l.gguf --slots 32,128 --modes off,lru,oracle -n 64 --rounds 1 \
        --out "$OUT" 2>&1 | tail -6
    ;;
modes)
    python3 bench/runtime_modes.py /tmp/moe-ref-a.gguf --predictors "$2" --slots 16,64 -n 128 --rounds 1 \
        --out "$OUT" 2>&1 | tail -14
    ;;
esac
