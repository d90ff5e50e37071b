#!/usr/bin/env bash
# GPU-machine checks of `--miss cpu|auto`, after `source bench/device_env.sh`. Step "build": the
# patched and the stock cuda-hopper libraries (each is cached; run it again if it ran out of time).
# Step "agreement": greedy tokens and perplexity of --miss cpu/auto (slots = k, so most experts run on
# the CPU) against stock all-on-GPU and stock `-ot exps=CPU`, on moe-ref-a, a 4-layer synthetic
# qwen3-30b-a3b and the tiny synthetic models, 16 prompts x 64 greedy tokens each (1024 tokens).
# Step "speed": tok/s of lru and exact (random predictor) with each miss policy at slots = k and 4k.
# Results (JSON + markdown) go to $OUT.
set -u
case "$1" in
build)
    python3 -m edge_preattn.cli build --preset cuda-hopper 2>&1 | tail -2
    python3 -m edge_preattn.cli build --preset cuda-hopper --stock 2>&1 | tail -2
    ;;
agreement)
    [ -f /tmp/q3-4l.gguf ] || python3 -m edge_preattn.cli synth --preset qwen3-30b-a3b --layers 4 \
        --type q4_0 -o /tmp/q3-4l.gguf 2>&1 | tail -1
    models=/tmp/q3-4l.gguf,synth:tiny,synth:tiny-deepseek2
    [ -f /tmp/moe-ref-a.gguf ] && models=/tmp/moe-ref-a.gguf,$models
    python3 bench/miss_cpu_agreement.py --preset cuda-hopper --tag gpu --models "$models" --out "$OUT" 2>&1 | tail -30
    ;;
speed)
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    for slots in 8 32; do
        for miss in upload cpu auto; do
            python3 -m edge_preattn.cli run -m /tmp/moe-ref-a.gguf --mode lru --slots $slots --miss $miss --temp 0 \
                -n 128 --stats-json "$OUT/miss-speed-lru-$slots-$miss.json" 2>&1 | tail -3
        done
    done
    ;;
esac
