#!/usr/bin/env bash
# The lead's GPU-machine calls of a session, in order, each one device call while the machine stays
# warm (files in /tmp survive between warm calls): `source bench/device_env.sh; bash bench/device_calls.sh N`.
# Session 4 (patch 0006) runs 9-11 in order; session 3 (patch 0005) ran 5-8; 1-4 made the session-2 results.
# moe-ref-a travels in three parts (the tree with the packaged model leaves ~43 MB a call):
#   1  carry .carry/whl .carry/llama-src.tgz .carry/p1 : machine facts, builds, synthetic models,
#      cache-mode equivalence (q3-4l), --miss agreement (q3-4l, tiny), qwen3-30b-a3b bench
#   2  carry .carry/p2 : deepseek-v2-lite bench, profile
#   3  carry .carry/p3 (last part + int8 predictors of moe-ref-a) : moe-ref-a equivalence, --miss
#      agreement and speed, moe-ref-a bench, memcheck, long run
set -u
# no predictors for the synthetic models this session (device time): lru, oracle and the miss policies
SYNTH_CONFIGS=all-gpu,exps-cpu,n-cpu-moe,ngl,lru,lru+cpu,lru+auto,oracle,oracle+cpu
# session 4: the synthetic models have predictors (trained on the device in call 9)
SESSION4_SYNTH=all-gpu,exps-cpu,n-cpu-moe,ngl,lru,top1,exact,oracle
mkdir -p "$OUT"
cp .carry/p*/moe-ref-a.part-* /tmp/ 2>/dev/null
stock_alias() {  # the fast stock library where find_library(stock=True) looks for it
    local dest
    dest=$(python3 -c "from edge_preattn import build; print(build.build_dir('cuda-hopper', True))")
    mkdir -p "$dest/lib" && ln -sf /tmp/stock-fast/lib/* "$dest/lib/"
}
join_ref() {
    [ -f /tmp/moe-ref-a.gguf ] || cat /tmp/moe-ref-a.part-a /tmp/moe-ref-a.part-b /tmp/moe-ref-a.part-c > /tmp/moe-ref-a.gguf
    echo "e8e4884eb661591b6508a075dc6489de995b4d0b33a352648e443240618033ca  /tmp/moe-ref-a.gguf" | sha256sum -c -
}
use_prebuilt() {  # a library built on the developer machine (its tarball, unpacked once), on the device's CUDA
    [ -f /tmp/prebuilt/lib/libllama.so ] || { mkdir -p /tmp/prebuilt && tar xJf "$1" -C /tmp/prebuilt; }
    export EDGE_PREATTN_LIB=/tmp/prebuilt/lib LD_PRELOAD=libcuda.so.1  # built against a stub libcuda
    for dir in /usr/local/cuda*/lib64 /usr/local/cuda*/targets/x86_64-linux/lib /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib; do
        [ -d "$dir" ] && LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:$dir
    done
    export LD_LIBRARY_PATH
}
packaged_runs() {  # ROUNDS XPREV: the packaged model at 8 of 32 slots, 256 tokens of one prompt: stock,
    # lru, and top1/exact with the shipped pre-attention predictors and with the cross-layer ones in XPREV
    local D=edge_preattn/data/edge-moe-default.gguf P=edge_preattn/onnx_models/edge-moe-default
    local prompt="The history of the printing press" round cfg mode preds name args
    mkdir -p "$OUT/runs"
    for round in $(seq "$1"); do
        for cfg in off: lru: exact:$P top1:$P exact:$2 top1:$2; do
            mode=${cfg%%:*} preds=${cfg#*:} name=${cfg%%:*}-$(basename "${preds:-none}")-r$round
            args=(--mode "$mode"); [ "$mode" != off ] && args+=(--slots 8); [ -n "$preds" ] && args+=(--predictors "$preds")
            timeout 30 python3 -m edge_preattn.cli run -m $D "${args[@]}" --temp 0 -n 256 -p "$prompt" \
                --stats-json "$OUT/runs/$name.json" > /dev/null 2>> "$OUT/runs/errors.log"
        done
    done
    python3 - "$OUT/runs" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    stats = json.loads(path.read_text())
    print(path.stem, {k: stats.get(k) for k in ("decode_tok_s", "hit_rate", "prefetch_issued", "prefetch_late", "prediction_off_at_ubatch")})
PY
}
case "$1" in
1)
    { nvidia-smi; lscpu; grep -o 'avx512[a-z_0-9]*\|amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' '; } > "$OUT/machine.txt" 2>&1
    STEP_TIMEOUT=330 bash bench/device_bench.sh setup 2>&1 | tail -12
    stock_alias
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    [ -f /tmp/q3-4l.gguf ] || python3 -m edge_preattn.cli synth --preset qwen3-30b-a3b --layers 4 --type q4_0 -o /tmp/q3-4l.gguf 2>&1 | tail -1
    timeout 60 python3 bench/cache_equivalence.py /tmp/q3-4l.gguf -n 64 --slots 8,32 --out "$OUT" 2>&1 | tail -8
    timeout 80 python3 bench/miss_cpu_agreement.py --preset cuda-hopper --tag gpu --n-prompts 8 \
        --models /tmp/q3-4l.gguf,synth:tiny --out "$OUT" 2>&1 | tail -12
    SYNTH_CONFIGS=$SYNTH_CONFIGS SYNTH_MODELS=qwen3-30b-a3b STEP_TIMEOUT=$((560 - SECONDS)) bash bench/device_bench.sh synth 2>&1 | tail -25
    ;;
2)
    stock_alias
    SYNTH_CONFIGS=$SYNTH_CONFIGS SYNTH_MODELS=deepseek-v2-lite STEP_TIMEOUT=330 bash bench/device_bench.sh synth 2>&1 | tail -25
    STEP_TIMEOUT=150 bash bench/device_bench.sh profile 2>&1 | tail -25
    ;;
3)
    stock_alias
    join_ref || exit 1
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    timeout 60 python3 bench/cache_equivalence.py /tmp/moe-ref-a.gguf -n 64 --slots 16,64 --out "$OUT" 2>&1 | tail -8
    timeout 90 python3 bench/miss_cpu_agreement.py --preset cuda-hopper --tag gpu-ref --n-prompts 8 \
        --models /tmp/moe-ref-a.gguf --out "$OUT" 2>&1 | tail -8
    cp -r .carry/p3/preds /tmp/preds/moe-ref-a 2>/dev/null || { mkdir -p /tmp/preds; cp -r .carry/p3/preds /tmp/preds/moe-ref-a; }
    CONFIGS=all-gpu,exps-cpu,n-cpu-moe,ngl,lru,lru+cpu,top1,exact,exact+cpu,overprov,adaptive,oracle REF_ROUNDS=2 STEP_TIMEOUT=300 bash bench/device_bench.sh ref 2>&1 | tail -25
    timeout 60 compute-sanitizer --tool memcheck --print-limit 20 python3 -m edge_preattn.cli run -m /tmp/moe-ref-a.gguf \
        --mode exact --predictors /tmp/preds/moe-ref-a --slots 16 --miss cpu -n 8 > "$OUT/memcheck.log" 2>&1
    echo "memcheck exit $?"; grep -E "ERROR SUMMARY" "$OUT/memcheck.log"
    ;;
4)  # one call when moe-ref-a cannot travel (the tree holds the packaged model): the packaged model
    # (trained routing, shipped predictors) stands in for it; carry .carry/whl .carry/llama-src.tgz
    D=edge_preattn/data/edge-moe-default.gguf P=edge_preattn/onnx_models/edge-moe-default
    { nvidia-smi; lscpu; grep -o 'avx512[a-z_0-9]*\|amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' '; } > "$OUT/machine.txt" 2>&1
    STEP_TIMEOUT=300 SYNTH_MODELS=deepseek-v2-lite bash bench/device_bench.sh setup 2>&1 | tail -3
    stock_alias
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    python3 -m edge_preattn.cli synth --preset qwen3-30b-a3b --layers 4 --type q4_0 -o /tmp/q3-4l.gguf 2>&1 | tail -1
    for env in "X=1" "GGML_CUDA_DISABLE_FUSION=1" "GGML_CUDA_DISABLE_GRAPHS=1"; do
        env $env timeout 40 python3 bench/cuda_logit_diff.py /tmp/q3-4l.gguf --slots 128 -n 12 2>/dev/null | tee -a "$OUT/cuda-logit-diff.jsonl"
        env $env timeout 30 python3 bench/cuda_logit_diff.py $D --slots 32 -n 12 2>/dev/null | tee -a "$OUT/cuda-logit-diff.jsonl"
    done
    timeout 60 python3 bench/cache_equivalence.py $D -n 64 --slots 8,32 --out "$OUT" 2>&1 | tail -8
    timeout 60 python3 bench/miss_cpu_agreement.py --preset cuda-hopper --tag gpu-default --n-prompts 8 \
        --models $D --out "$OUT" 2>&1 | tail -6
    mkdir -p "$OUT/bench"
    timeout $((585 - SECONDS)) python3 -m edge_preattn.cli bench $D -n 32 --rounds 2 -t "$(nproc)" \
        --stock-lib /tmp/stock-fast/lib -o "$OUT/bench" --vram-budget 25%,50%,75% --predictors $P \
        --configs all-gpu,exps-cpu,n-cpu-moe,ngl,lru,lru+cpu,top1,exact,exact+cpu,overprov,adaptive,oracle 2>&1 | grep -v "^$" | tail -12
    ;;
5)  # session 3, call 1 (after patch 0005); carry .carry/whl .carry/llama-src.tgz .carry/q1 (moe-ref-a part a):
    # builds; CUDA exactness (q3-4l short prompts, logits at slots = E, packaged model); GPU long run
    cp .carry/q*/moe-ref-a.part-* /tmp/ 2>/dev/null
    { nvidia-smi; lscpu; } > "$OUT/machine.txt" 2>&1
    STEP_TIMEOUT=320 SYNTH_MODELS=qwen3-30b-a3b bash bench/device_bench.sh setup 2>&1 | tail -4
    stock_alias
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    D=edge_preattn/data/edge-moe-default.gguf
    python3 -m edge_preattn.cli synth --preset qwen3-30b-a3b --layers 4 --type q4_0 -o /tmp/q3-4l.gguf 2>&1 | tail -1
    timeout 40 python3 bench/cuda_logit_diff.py /tmp/q3-4l.gguf --slots 128 -n 12 2>/dev/null | tee -a "$OUT/cuda-logit-diff.jsonl"
    timeout 90 python3 bench/cache_equivalence.py /tmp/q3-4l.gguf -n 64 --slots 8,32 --out "$OUT" 2>&1 | tail -4
    timeout 45 python3 bench/cache_equivalence.py $D -n 64 --slots 8,32 --out "$OUT" 2>&1 | tail -4
    timeout $((590 - SECONDS)) python3 bench/long_run.py $D --tokens 20000 --piece 800 --out "$OUT" 2>&1 | tail -2
    ;;
6)  # call 2, warm; carry .carry/q2 (part b): packaged model and qwen3-30b-a3b benches
    cp .carry/q*/moe-ref-a.part-* /tmp/ 2>/dev/null
    stock_alias
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    D=edge_preattn/data/edge-moe-default.gguf P=edge_preattn/onnx_models/edge-moe-default
    mkdir -p "$OUT/bench-default" /tmp/bench-results
    timeout 200 python3 -m edge_preattn.cli bench $D -n 32 --rounds 2 -t "$(nproc)" \
        --stock-lib /tmp/stock-fast/lib -o "$OUT/bench-default" --vram-budget 25%,50%,75% --predictors $P \
        --configs all-gpu,exps-cpu,n-cpu-moe,ngl,lru,lru+cpu,top1,exact,overprov,adaptive,oracle 2>&1 | grep -v "^$" | tail -6
    SYNTH_CONFIGS=all-gpu,exps-cpu,n-cpu-moe,ngl,lru,lru+cpu,lru+auto,oracle CAPPED_CONFIGS=lru \
        SYNTH_MODELS=qwen3-30b-a3b STEP_TIMEOUT=$((585 - SECONDS)) bash bench/device_bench.sh synth 2>&1 | tail -14
    ;;
7)  # call 3, warm; carry .carry/q3 (part c + moe-ref-a's int8 predictors): moe-ref-a
    cp .carry/q*/moe-ref-a.part-* /tmp/ 2>/dev/null
    stock_alias
    join_ref || exit 1
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    rm -rf /tmp/preds/moe-ref-a && mkdir -p /tmp/preds && cp -r .carry/q3/preds /tmp/preds/moe-ref-a
    timeout 60 python3 bench/cache_equivalence.py /tmp/moe-ref-a.gguf -n 64 --slots 16,64 --out "$OUT" 2>&1 | tail -4
    CONFIGS=all-gpu,exps-cpu,n-cpu-moe,ngl,lru,top1,exact,overprov,adaptive,oracle CAPPED_CONFIGS=lru,exact,oracle \
        REF_ROUNDS=2 STEP_TIMEOUT=$((500 - SECONDS)) bash bench/device_bench.sh ref 2>&1 | tail -14
    timeout 60 compute-sanitizer --tool memcheck --print-limit 20 python3 -m edge_preattn.cli run -m /tmp/moe-ref-a.gguf \
        --mode exact --predictors /tmp/preds/moe-ref-a --slots 16 -n 8 > "$OUT/memcheck.log" 2>&1
    echo "memcheck exit $?"; grep -E "ERROR SUMMARY" "$OUT/memcheck.log"
    ;;
8)  # call 4, warm: deepseek-v2-lite bench and profile
    stock_alias
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    python3 -m edge_preattn.cli synth --preset deepseek-v2-lite --type q4_0 -o /tmp/models/deepseek-v2-lite-q4_0.gguf 2>&1 | tail -1
    SYNTH_CONFIGS=all-gpu,exps-cpu,n-cpu-moe,ngl,lru,lru+cpu,oracle CAPPED_CONFIGS=lru SYNTH_MODELS=deepseek-v2-lite \
        STEP_TIMEOUT=$((420 - SECONDS)) bash bench/device_bench.sh synth 2>&1 | tail -10
    STEP_TIMEOUT=$((585 - SECONDS)) bash bench/device_bench.sh profile 2>&1 | tail -12
    ;;
9)  # session 4 (patch 0006, the modelled bus), call 1; carry .carry/whl .carry/llama-src.tgz .carry/q1
    # .carry/train.txt: builds, both synthetic models, predictors for them, then the qwen3-30b-a3b bench
    # for the time left
    cp .carry/q*/moe-ref-a.part-* /tmp/ 2>/dev/null
    { nvidia-smi; lscpu; } > "$OUT/machine.txt" 2>&1
    STEP_TIMEOUT=330 bash bench/device_bench.sh setup 2>&1 | tail -5
    stock_alias
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    STEP_TIMEOUT=$((480 - SECONDS)) bash bench/device_bench.sh predictors 2>&1 | tail -4
    SYNTH_CONFIGS=$SESSION4_SYNTH CAPPED_CONFIGS=lru,exact SYNTH_MODELS=qwen3-30b-a3b \
        STEP_TIMEOUT=$((570 - SECONDS)) bash bench/device_bench.sh synth 2>&1 | tail -6
    ;;
10) # call 2, warm; carry .carry/q2 (part b + moe-ref-a's int8 predictors): call 9's predictor step ran out of
    # time after qwen3-30b-a3b, so deepseek-v2-lite's predictors first, then the qwen3-30b-a3b bench resumed
    cp .carry/q*/moe-ref-a.part-* /tmp/ 2>/dev/null
    rm -rf /tmp/preds/moe-ref-a && mkdir -p /tmp/preds && cp -r .carry/q2/preds /tmp/preds/moe-ref-a
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    STEP_TIMEOUT=240 bash bench/device_bench.sh predictors 2>&1 | grep -v epoch | tail -5
    SYNTH_CONFIGS=$SESSION4_SYNTH CAPPED_CONFIGS=lru,exact SYNTH_MODELS=qwen3-30b-a3b \
        STEP_TIMEOUT=$((575 - SECONDS)) bash bench/device_bench.sh synth 2>&1 | tail -5
    ;;
11) # call 3, warm; carry .carry/q3 (part c): moe-ref-a exactness after the
    # bypass fix, slots = E overhead, the 8 GB/s runs on the modelled bus, memcheck; then what is left
    cp .carry/q*/moe-ref-a.part-* /tmp/ 2>/dev/null
    stock_alias
    join_ref || exit 1
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    timeout 60 python3 bench/cache_equivalence.py /tmp/moe-ref-a.gguf -n 64 --slots 16,64 --out "$OUT" 2>&1 | tail -4
    mkdir -p "$OUT/slots-e"
    for keep in "" --keep-late-predictions; do
        timeout 45 python3 bench/cache_equivalence.py /tmp/moe-ref-a.gguf -n 256 --slots 64 --modes lru,top1,exact \
            $keep --out "$OUT/slots-e" 2>&1 | tail -3
    done
    CONFIGS=all-gpu CAPPED_CONFIGS=lru,top1,exact,oracle REF_ROUNDS=2 STEP_TIMEOUT=150 \
        bash bench/device_bench.sh ref 2>&1 | tail -6
    timeout 60 compute-sanitizer --tool memcheck --print-limit 20 python3 -m edge_preattn.cli run -m /tmp/moe-ref-a.gguf \
        --mode exact --predictors /tmp/preds/moe-ref-a --slots 16 --bandwidth 8GB/s -n 8 > "$OUT/memcheck.log" 2>&1
    echo "memcheck exit $?"; grep -E "ERROR SUMMARY" "$OUT/memcheck.log"
    for preset in deepseek-v2-lite qwen3-30b-a3b; do
        budgets=6GiB,10GiB,14GiB; [ $preset = deepseek-v2-lite ] && budgets=6GiB
        SYNTH_CONFIGS=$SESSION4_SYNTH CAPPED_CONFIGS=lru,exact SYNTH_MODELS=$preset SYNTH_BUDGETS=$budgets \
            STEP_TIMEOUT=$((470 - SECONDS)) bash bench/device_bench.sh synth 2>&1 | tail -4
    done
    ;;
12) # call 4, warm: CUDA exactness of the packaged model and the 4-layer qwen3-30b-a3b under patch 0006
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    timeout 60 python3 bench/cache_equivalence.py edge_preattn/data/edge-moe-default.gguf -n 64 --slots 8,32 \
        --out "$OUT" 2>&1 | tail -6
    python3 -m edge_preattn.cli synth --preset qwen3-30b-a3b --layers 4 --type q4_0 -o /tmp/q3-4l.gguf 2>&1 | tail -1
    timeout 120 python3 bench/cache_equivalence.py /tmp/q3-4l.gguf -n 64 --slots 8,32 --out "$OUT" 2>&1 | tail -6
    ;;
13) # call 5, warm: the miss policies at 14 GiB (session 3's runs of them aborted on an offload bug). The
    # bench writes tables of the configurations asked for: keep them apart (*-miss-policies.*)
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    SYNTH_CONFIGS=lru,lru+cpu,lru+auto CAPPED_CONFIGS=lru+auto SYNTH_MODELS=qwen3-30b-a3b SYNTH_BUDGETS=14GiB \
        STEP_TIMEOUT=200 bash bench/device_bench.sh synth 2>&1 | tail -8
    ;;
14) # next session, after moe-ref-a is assembled and the builds exist (calls like 9-11); carry .carry/xprev
    # (moe-ref-a's cross-layer int8 predictors, trained on x_prev): patch 0007 at slots = E, and patch
    # 0008's cross-layer prediction against pre-attention prediction and lru
    join_ref || exit 1
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    rm -rf /tmp/preds/moe-ref-a-xprev && cp -r .carry/xprev /tmp/preds/moe-ref-a-xprev
    mkdir -p "$OUT/slots-e"
    for keep in "" --keep-late-predictions; do
        timeout 45 python3 bench/cache_equivalence.py /tmp/moe-ref-a.gguf -n 256 --slots 64 --modes lru,top1,exact \
            $keep --out "$OUT/slots-e" 2>&1 | tail -3
    done
    for preds in moe-ref-a moe-ref-a-xprev; do
        mkdir -p "/tmp/bench-results/$preds"
        timeout $((300 - SECONDS)) python3 -m edge_preattn.cli bench /tmp/moe-ref-a.gguf -n 32 --rounds 2 \
            -t "$(nproc)" --stock-lib /tmp/stock-fast/lib -o "/tmp/bench-results/$preds" --vram-budget 25%,50% \
            --bandwidth none,8GB/s --predictors "/tmp/preds/$preds" --configs lru,top1,exact 2>&1 | tail -4
    done
    tar czf "$OUT/bench-xprev.tgz" -C /tmp bench-results/moe-ref-a bench-results/moe-ref-a-xprev
    ;;
15) # fourth session, with 4.6 device minutes left (too few to build there): the cuda-hopper library of patches
    # 0001-0008 built on the developer machine (same CUDA 13.0, cuBLAS from the nvidia-cublas wheel), carried
    # for sm_90 only (no PTX: 20.5 MB as .carry/cudalib/lib.tar.xz), with .carry/whl and .carry/preds-default-xprev (cross-layer predictors of
    # the packaged model, trained on x_prev). Packaged model: patch 0007 at slots = E, and patch 0008's
    # cross-layer prediction against the shipped pre-attention predictors and lru at 8 of 32 slots
    use_prebuilt .carry/cudalib/lib.tar.xz
    D=edge_preattn/data/edge-moe-default.gguf
    python3 -c "from edge_preattn import native; print(native.NativeApi(native.load_llama()).build_info())" 2>&1 | tail -2
    mkdir -p "$OUT/slots-e"
    timeout 40 python3 bench/cache_equivalence.py $D -n 256 --slots 32 --modes lru,exact --out "$OUT/slots-e" 2>&1 | tail -3
    packaged_runs 1 .carry/preds-default-xprev
    ;;
16) # fifth session (patch 0009: quiet ubatches, full banks filled at enable), call 1; carry .carry/whl
    # .carry/llama-src.tgz .carry/q1: builds; slots = E against stock all-on-GPU on the packaged model
    # (also without CUDA graphs, to see what they are worth), on the 4-layer and the full-size synthetic
    # qwen3-30b-a3b; CUDA exactness through the new fill path
    cp .carry/q*/moe-ref-a.part-* /tmp/ 2>/dev/null
    { nvidia-smi; lscpu; } > "$OUT/machine.txt" 2>&1
    SYNTH_MODELS=qwen3-30b-a3b STEP_TIMEOUT=330 bash bench/device_bench.sh setup 2>&1 | tail -5
    stock_alias
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    python3 -c "from edge_preattn import native; print(native.NativeApi(native.load_llama()).build_info())" 2>&1 | tail -1
    D=edge_preattn/data/edge-moe-default.gguf
    mkdir -p "$OUT/slots-e" "$OUT/slots-e-nographs" "$OUT/slots-e-q3"
    timeout 60 python3 bench/cache_equivalence.py $D -n 256 --slots 32 --modes lru,top1,exact --out "$OUT/slots-e" 2>&1 | tail -4
    GGML_CUDA_DISABLE_GRAPHS=1 timeout 60 python3 bench/cache_equivalence.py $D -n 256 --slots 32 --modes lru,exact \
        --out "$OUT/slots-e-nographs" 2>&1 | tail -3
    python3 -m edge_preattn.cli synth --preset qwen3-30b-a3b --layers 4 --type q4_0 -o /tmp/q3-4l.gguf 2>&1 | tail -1
    timeout 90 python3 bench/cache_equivalence.py /tmp/q3-4l.gguf -n 64 --slots 8,128 --modes lru,exact --out "$OUT" 2>&1 | tail -5
    timeout $((585 - SECONDS)) python3 bench/cache_equivalence.py /tmp/models/qwen3-30b-a3b-q4_0.gguf -n 64 --slots 128 \
        --modes lru,exact --out "$OUT/slots-e-q3" 2>&1 | tail -3
    ;;
17) # call 2, warm; carry .carry/q2 (now part b alone: its predictors moved to .carry/refpreds, so that every
    # call fits): the packaged model's slots = E once more (a second sample), then cross-layer against
    # pre-attention prediction on the packaged model at 8 of 32 slots, two rounds
    cp .carry/q*/moe-ref-a.part-* /tmp/ 2>/dev/null
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    D=edge_preattn/data/edge-moe-default.gguf
    mkdir -p "$OUT/slots-e-2"
    timeout 60 python3 bench/cache_equivalence.py $D -n 256 --slots 32 --modes lru,top1,exact --out "$OUT/slots-e-2" 2>&1 | tail -4
    cp -r .carry/preds-default-xprev /tmp/preds-default-xprev 2>/dev/null
    packaged_runs 2 /tmp/preds-default-xprev
    ;;
18) # call 3, warm; carry .carry/q3 (part c): moe-ref-a at slots = E (patch 0009) and its attention time per
    # layer (profile: the window a pre-attention prediction has)
    cp .carry/q*/moe-ref-a.part-* /tmp/ 2>/dev/null
    join_ref || exit 1
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    mkdir -p "$OUT/slots-e" "$OUT/profile"
    timeout 60 python3 bench/cache_equivalence.py /tmp/moe-ref-a.gguf -n 256 --slots 64 --modes lru,top1,exact \
        --out "$OUT/slots-e" 2>&1 | tail -4
    timeout 120 python3 -m edge_preattn.cli profile /tmp/moe-ref-a.gguf -n 32 -o "$OUT/profile" 2>&1 | grep -v "^$" | tail -14
    ;;
19) # call 4, warm; carry .carry/refpreds and .carry/xprev (moe-ref-a's int8 predictors: pre-attention, and
    # cross-layer trained on x_prev): cross-layer against pre-attention prediction and lru, at 25% and 50%
    # of the experts, uncapped and on the 8 GB/s modelled bus (what call 14 was written for)
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    rm -rf /tmp/preds/moe-ref-a /tmp/preds/moe-ref-a-xprev && mkdir -p /tmp/preds
    cp -r .carry/refpreds/preds /tmp/preds/moe-ref-a && cp -r .carry/xprev /tmp/preds/moe-ref-a-xprev
    for preds in moe-ref-a-xprev moe-ref-a; do
        mkdir -p "/tmp/bench-results/$preds"
        timeout $((560 - SECONDS)) python3 -m edge_preattn.cli bench /tmp/moe-ref-a.gguf -n 32 --rounds 2 \
            -t "$(nproc)" --stock-lib /tmp/stock-fast/lib -o "/tmp/bench-results/$preds" --vram-budget 25%,50% \
            --bandwidth none,8GB/s --predictors "/tmp/preds/$preds" --configs lru,top1,exact 2>&1 | tail -4
    done
    tar czf "$OUT/bench-xprev.tgz" -C /tmp bench-results/moe-ref-a bench-results/moe-ref-a-xprev
    ;;
20) # fifth session, second machine (patch 0010: no cont for one token's ids, no map at slots = E); carry
    # .carry/whl .carry/llama-src.tgz: builds; slots = E against stock all-on-GPU (packaged model twice,
    # full-size synthetic qwen3-30b-a3b); CUDA exactness of every mode (packaged model, 4-layer qwen3-30b-a3b);
    # then, for the time left, qwen3-30b-a3b at 6 and 14 GiB: lru against the best stock offload
    { nvidia-smi; lscpu; } > "$OUT/machine.txt" 2>&1
    SYNTH_MODELS=qwen3-30b-a3b STEP_TIMEOUT=330 bash bench/device_bench.sh setup 2>&1 | tail -5
    stock_alias
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    python3 -c "from edge_preattn import native; print(native.NativeApi(native.load_llama()).build_info())" 2>&1 | tail -1
    D=edge_preattn/data/edge-moe-default.gguf
    for i in 1 2; do
        mkdir -p "$OUT/slots-e-$i"
        timeout 60 python3 bench/cache_equivalence.py $D -n 256 --slots 32 --modes lru,top1,exact --out "$OUT/slots-e-$i" 2>&1 | tail -3
    done
    mkdir -p "$OUT/slots-e-q3"
    timeout 150 python3 bench/cache_equivalence.py /tmp/models/qwen3-30b-a3b-q4_0.gguf -n 128 --slots 128 \
        --modes lru,exact --out "$OUT/slots-e-q3" 2>&1 | tail -3
    timeout 60 python3 bench/cache_equivalence.py $D -n 64 --slots 8,32 --out "$OUT" 2>&1 | tail -10
    python3 -m edge_preattn.cli synth --preset qwen3-30b-a3b --layers 4 --type q4_0 -o /tmp/q3-4l.gguf 2>&1 | tail -1
    timeout 120 python3 bench/cache_equivalence.py /tmp/q3-4l.gguf -n 64 --slots 8,32,128 --modes lru,top1,exact,oracle \
        --out "$OUT" 2>&1 | tail -12
    SYNTH_CONFIGS=all-gpu,exps-cpu,n-cpu-moe,lru CAPPED_CONFIGS=lru SYNTH_MODELS=qwen3-30b-a3b SYNTH_BUDGETS=6GiB,14GiB \
        STEP_TIMEOUT=$((560 - SECONDS)) bash bench/device_bench.sh synth 2>&1 | tail -8
    ;;
21) # fifth session, third machine; carry .carry/whl .carry/llama-src.tgz: builds, then slots = E against stock
    # all-on-GPU in interleaved rounds, each context warmed up first (bench/slots_e_overhead.py): the full-size
    # synthetic qwen3-30b-a3b, the 4-layer one and the packaged model
    SYNTH_MODELS=qwen3-30b-a3b STEP_TIMEOUT=330 bash bench/device_bench.sh setup 2>&1 | tail -3
    export EDGE_PREATTN_LIB=$(ls -d /tmp/edge-cache/builds/cuda-hopper-*-patched-*/lib | tail -1)
    python3 -m edge_preattn.cli synth --preset qwen3-30b-a3b --layers 4 --type q4_0 -o /tmp/q3-4l.gguf 2>&1 | tail -1
    timeout 60 python3 bench/slots_e_overhead.py edge_preattn/data/edge-moe-default.gguf -n 256 --rounds 3 \
        --out "$OUT" 2>&1 | grep "^|"
    timeout 90 python3 bench/slots_e_overhead.py /tmp/q3-4l.gguf -n 256 --rounds 3 --out "$OUT" 2>&1 | grep "^|"
    timeout $((590 - SECONDS)) python3 bench/slots_e_overhead.py /tmp/models/qwen3-30b-a3b-q4_0.gguf -n 128 --rounds 3 \
        --modes lru,exact --out "$OUT" 2>&1 | grep "^|\|round"
    ;;
22) # fifth session, last 7.8 device minutes (too few to build there): the cuda-hopper library of patches
    # 0001-0010 built on the developer machine for sm_90 only (as call 15; .carry/cudalib10/lib.tar.xz), and
    # moe-ref-a at slots = E in interleaved rounds. Stages, one call each: `22 lib` (carry .carry/cudalib10
    # .carry/whl), `22 part` (carry .carry/q1, then .carry/q2), `22 ref` (carry .carry/q3)
    [ "${2:-}" = lib ] || cp .carry/q*/moe-ref-a.part-* /tmp/
    [ "${2:-}" = ref ] && { join_ref || exit 1; }
    use_prebuilt .carry/cudalib10/lib.tar.xz
    python3 -c "from edge_preattn import native; print(native.NativeApi(native.load_llama()).build_info())" 2>&1 | tail -1
    if [ "${2:-}" = ref ]; then
        timeout 200 python3 bench/slots_e_overhead.py /tmp/moe-ref-a.gguf -n 256 --rounds 3 --out "$OUT" 2>&1 | grep "^|"
    fi
    ;;
esac
# a call returns at most 8 files: everything this call wrote goes back in one archive
(cd "$OUT" && tar czf /tmp/call-out.tgz --exclude=call-out.tgz . && find . -mindepth 1 -delete && mv /tmp/call-out.tgz "$OUT/")
