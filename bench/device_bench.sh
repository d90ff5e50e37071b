#!/usr/bin/env bash
# Issue 7's runs on the GPU machine: `source bench/device_env.sh && bash bench/device_bench.sh STEP...`.
# Each step fits one device call; its files stay in /tmp while the machine is warm. Every call ends by
# packing all results so far (/tmp/bench-results) into $OUT/results.tgz and copying the markdown
# tables to $OUT/results/ (a call returns at most 8 files: the tables are also inside the archive).
#
#   setup       patched cuda-hopper build; the stock library as an unpatched libllama on that build's
#               ggml (the patches touch only libllama: ~30 s instead of a second ~190 s CUDA build);
#               synthesizes qwen3-30b-a3b and deepseek-v2-lite (q4_0) while it compiles
#               carry: .carry/whl .carry/llama-src.tgz
#   predictors  collect (sampled, all on the GPU) and train predictors for the two synthetic models
#               carry: .carry/train.txt
#   ref         moe-ref-a with its predictors at 25%,50%,75% of its experts, uncapped and 8 GB/s
#               carry: .carry/preds; moe-ref-a's parts (.carry/moe-ref-a.part-*, any number, each
#               carried by some earlier call: device_env.sh copies them to /tmp)
#   synth       the two synthetic models at 6,10,14 GiB, uncapped and 16 GB/s (capped: CAPPED_CONFIGS)
#   profile     `profile` of deepseek-v2-lite
# Knobs (environment): N tokens per prompt (32), PROMPTS file (bench's 3 built-in prompts),
# REF_ROUNDS (2), SYNTH_ROUNDS (1), CONFIGS for moe-ref-a (all), SYNTH_CONFIGS (all but top1 and
# adaptive, to save device time; the synthetic predictors are uncalibrated anyway), CAPPED_CONFIGS
# (lru,exact,oracle), SYNTH_MODELS (qwen3-30b-a3b deepseek-v2-lite), SYNTH_BUDGETS (6GiB,10GiB,14GiB),
# STEP_TIMEOUT (560: seconds all the benches of one step may take, so that a call of timeout_s 600
# still packs), PRESET (cuda-hopper).
# A bench cut short by STEP_TIMEOUT keeps what it measured; the same step again resumes it.
set -u
R=/tmp/bench-results
M=/tmp/models
mkdir -p "$R" "$M" /tmp/preds
N=${N:-32}
CONFIGS=${CONFIGS:-all-gpu,exps-cpu,n-cpu-moe,ngl,lru,top1,exact,overprov,adaptive,oracle}
SYNTH_CONFIGS=${SYNTH_CONFIGS:-all-gpu,exps-cpu,n-cpu-moe,ngl,lru,exact,overprov,oracle}
CAPPED_CONFIGS=${CAPPED_CONFIGS:-lru,exact,oracle}
SYNTH_MODELS=${SYNTH_MODELS:-qwen3-30b-a3b deepseek-v2-lite}
SYNTH_BUDGETS=${SYNTH_BUDGETS:-6GiB,10GiB,14GiB}
STEP_TIMEOUT=${STEP_TIMEOUT:-560}
PRESET=${PRESET:-cuda-hopper}
THREADS=$(nproc)
PROMPT_ARGS=()
[ -n "${PROMPTS:-}" ] && PROMPT_ARGS=(-p "$PROMPTS")
[ -d .carry/preds ] && rm -rf /tmp/preds/moe-ref-a && cp -r .carry/preds /tmp/preds/moe-ref-a
[ -f .carry/train.txt ] && cp .carry/train.txt /tmp/train.txt

edge() { python3 -m edge_preattn.cli "$@"; }
stamp() { echo "[$(date +%T)] $*"; }
patched_lib() { ls -d "${EDGE_PREATTN_CACHE:-/tmp/edge-cache}"/builds/"$PRESET"-*-patched-*/lib 2>/dev/null | tail -1; }

stock_lib() {
    # The unpatched libllama, compiled against the patched build's ggml (identical sources): a stock
    # llama.cpp whose ggml libraries are the very files the patched one loads (symlinks, one copy).
    local patched out=/tmp/stock-fast
    patched=$(patched_lib)
    if [ ! -f "$out/lib/libllama.so" ]; then
        cmake -S "$EDGE_PREATTN_LLAMA_SOURCE" -B "$out/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
            -DBUILD_SHARED_LIBS=ON -DLLAMA_USE_SYSTEM_GGML=ON -Dggml_DIR="$patched/cmake/ggml" \
            -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
            > "$R/stock-libllama-build.log" 2>&1 &&
            cmake --build "$out/build" --target llama -j "$THREADS" >> "$R/stock-libllama-build.log" 2>&1 ||
            { tail -20 "$R/stock-libllama-build.log"; return 1; }
        mkdir -p "$out/lib" && ln -sf "$patched"/libggml*.so* "$out/lib/" && cp -a "$out/build/bin"/libllama.so* "$out/lib/"
    fi
    echo "$out/lib"
}

ref_model() {
    # moe-ref-a arrives as parts over several calls (a call carries at most 64 MiB with the tree):
    # joined once every part is there, whatever their number, and checked against its sha256.
    local want=e8e4884eb661591b6508a075dc6489de995b4d0b33a352648e443240618033ca
    echo "$want  /tmp/moe-ref-a.gguf" | sha256sum -c --status - 2>/dev/null && return 0
    cat /tmp/moe-ref-a.part-* > /tmp/moe-ref-a.gguf 2>/dev/null
    echo "$want  /tmp/moe-ref-a.gguf" | sha256sum -c --status - && return 0
    echo "moe-ref-a: the parts in /tmp ($(ls /tmp/moe-ref-a.part-* 2>/dev/null | xargs -n1 basename | tr '\n' ' ')) are not all there yet"
    rm -f /tmp/moe-ref-a.gguf
    return 1
}

synth_model() {  # $1 preset -> /tmp/models/$1-q4_0.gguf
    [ -f "$M/$1-q4_0.gguf" ] || edge synth --preset "$1" --type q4_0 -o "$M/$1-q4_0.gguf" 2>&1 | tail -1
}

bench() {  # bench MODEL OUTDIR-NAME ROUNDS [bench args...]
    local model=$1 name=$2 rounds=$3
    shift 3
    mkdir -p "$R/$name"
    local left=$((step_end - SECONDS))
    [ "$left" -gt 20 ] || { echo "no time left in this step for $name: run the step again"; return; }
    timeout -s TERM "$left" python3 -m edge_preattn.cli bench "$model" -n "$N" --rounds "$rounds" \
        -t "$THREADS" --stock-lib "$(stock_lib)" -o "$R/$name" "${PROMPT_ARGS[@]}" "$@" 2>&1 | grep -v "^$" | tail -8
}

pack() {
    mkdir -p "$OUT/results"
    find "$R" -name '*.md' -newer /tmp/.device-bench-start -exec cp {} "$OUT/results/" \; 2>/dev/null
    ls "$OUT/results" | head -7 | sed 's/^/  returned: /'
    find "$OUT/results" -type f | tail -n +8 | xargs -r rm -f  # at most 7 here + the archive
    tar czf "$OUT/results.tgz" -C /tmp bench-results
}

touch /tmp/.device-bench-start
export EDGE_PREATTN_LIB=${EDGE_PREATTN_LIB:-$(patched_lib)}
for step in "$@"; do
    stamp "step $step"
    step_end=$((SECONDS + STEP_TIMEOUT))
    case "$step" in
    setup)
        for preset in $SYNTH_MODELS; do synth_model "$preset"; done > "$R/synth.log" 2>&1 &
        edge build --preset "$PRESET" 2>&1 | tail -1
        export EDGE_PREATTN_LIB=$(patched_lib)
        stamp "stock library: $(stock_lib)"
        wait
        cat "$R/synth.log"
        nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
        ;;
    predictors)
        for preset in $SYNTH_MODELS; do
            [ -f "/tmp/preds/$preset/predictors.json" ] && continue
            timeout $((step_end - SECONDS)) python3 -m edge_preattn.cli collect "$M/$preset-q4_0.gguf" \
                --prompts /tmp/train.txt -n "$N" --max-samples 1500 -o "/tmp/traces/$preset" 2>&1 | tail -1
            timeout $((step_end - SECONDS)) python3 -m edge_preattn.cli train "/tmp/traces/$preset" --epochs 3 \
                -o "/tmp/preds/$preset" 2>&1 | tail -1
            stamp "predictors for $preset"
        done
        ;;
    ref)
        ref_model || continue
        bench /tmp/moe-ref-a.gguf moe-ref-a "${REF_ROUNDS:-2}" --vram-budget 25%,50%,75% --bandwidth none \
            --predictors /tmp/preds/moe-ref-a --configs "$CONFIGS"
        bench /tmp/moe-ref-a.gguf moe-ref-a "${REF_ROUNDS:-2}" --vram-budget 25%,50%,75% --bandwidth 8GB/s \
            --predictors /tmp/preds/moe-ref-a --configs "$CAPPED_CONFIGS"
        ;;
    synth)
        for preset in $SYNTH_MODELS; do
            preds=()
            [ -f "/tmp/preds/$preset/predictors.json" ] && preds=(--predictors "/tmp/preds/$preset")
            bench "$M/$preset-q4_0.gguf" "$preset" "${SYNTH_ROUNDS:-1}" --vram-budget "$SYNTH_BUDGETS" \
                --bandwidth none "${preds[@]}" --configs "$SYNTH_CONFIGS"
            bench "$M/$preset-q4_0.gguf" "$preset" "${SYNTH_ROUNDS:-1}" --vram-budget "$SYNTH_BUDGETS" \
                --bandwidth 16GB/s "${preds[@]}" --configs "$CAPPED_CONFIGS"
        done
        ;;
    profile)
        mkdir -p "$R/profile"
        edge profile "$M/deepseek-v2-lite-q4_0.gguf" -n 64 -o "$R/profile" 2>&1 | grep -v "^$" | tail -30
        ;;
    *)
        echo "unknown step $step (setup predictors ref synth profile)"
        ;;
    esac
    stamp "done $step"
done
pack
