#!/usr/bin/env bash
# The GPU machine (no network): `bash bench/device.sh STEP [ARGS...]` from the repository root.
# Each step fits one device call; /tmp survives between calls while the machine is warm. Results and
# logs go to $OUT (at most 8 files come back: each step packs its folder into one archive).
#
#   setup            wheels, the llama.cpp source and the patched cuda-hopper build
#                    (carry: .carry/whl .carry/llama-src.tgz; .carry is ignored by git, so make it here:
#                    `pip download --no-deps -d .carry/whl gguf==0.19.0 diskcache`, `CMAKE_ARGS=-DLLAMA_BUILD=OFF
#                    pip wheel --no-deps -w .carry/whl <llama-cpp-python 0.3.36 sdist>`, and `tar czf
#                    .carry/llama-src.tgz -C $EDGE_PREATTN_CACHE/src/llama.cpp-lcp0.3.36 .` after a local build)
#   stock            a stock libllama on the patched build's ggml (bench compares against it)
#   modes MODEL ARGS greedy `run` of MODEL in stock placement and in lru/top1/exact/oracle (ARGS: cache
#                    flags; PREDICTORS=DIR for top1/exact, default the packaged model's),
#                    each with --stats-json in $OUT: same tokens, counters
#   part FILE...     keep carried model parts in /tmp/parts (a model over 64 MiB travels in parts; the
#                    working tree is ~27 MB of the 64 MiB a call carries, so one 27 MB part per call:
#                    `split -b 27000000 -d -a 1 moe-ref-a.gguf .carry/parts/moe-ref-a.gguf.part-`)
#   join NAME SHA256 join /tmp/parts/NAME.part-* into /tmp/models/NAME and check its sha256
#   widen MODEL      synth --widen-from MODEL --expert-bytes-like qwen3-30b-a3b -> /tmp/models/<stem>-wide.gguf
#   mps-probe        SMs, device copy and host-to-device rate under MPS shares (carry: .carry/mps_probe.sh)
#   bench MODEL ARGS `edge-preattn bench MODEL ARGS -o /tmp/results/<model>`, packed into $OUT
#   test ARGS        pytest on the GPU build (EDGE_PREATTN_TEST_PRESET=cuda-hopper)
#   first [SECONDS]  everything a first call needs, within SECONDS (default 560): setup, the widened
#                    packaged model, `modes` in both residencies, the GPU tests, stock, and in the time
#                    left a bench at 25 % of the cache configurations against all-gpu and ngl
#   presets P...     configure each CUDA preset on the patched source and compile the CUDA sources the
#                    patches touch (the rest of ggml-cuda is stock), in parallel, into $OUT/presets.log
#
# The headline table of issue 17, one model per call after `setup` (C: the bench options shared by all):
#   C="--predictors DIR --configs all-gpu,exps-cpu,n-cpu-moe,ngl,lru,top1,exact,oracle --copy-queue"
#   (add lru+token,top1+token,exact+token,oracle+token for residency decided between tokens; for
#   predictions made layers ahead, exact+gpu,exact+lead,top1+lead with --lead-predictors DIR, a set
#   trained with `train --lead 1024` on the CPU beforehand and carried: bench/results/accuracy-lead-*.md)
#   bench MODEL $C --vram-budget 25%,50% -t 8
#   bench MODEL $C --vram-budget 25%,50% --emulate rtx4070-pcie4   (and laptop-pcie4x8)
# The same greedy text and the host synchronizations per token in every mode, both residencies:
#   modes MODEL --slots 8 --copy-queue;  modes MODEL --slots 8 --copy-queue --residency token
#   (each packs $OUT/modes-<model>.tgz: rename the first before the second)
set -u
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EDGE_PREATTN_CACHE=/tmp/edge-cache EDGE_PREATTN_LLAMA_SOURCE=/tmp/llsrc
# The image's CC/CXX link libstdc++ statically into each shared library: two copies crash at model load.
unset CC CXX
PRESET=${PRESET:-cuda-hopper}
mkdir -p /tmp/models /tmp/results /tmp/parts "${OUT:-/tmp/out}"
edge() { python3 -m edge_preattn.cli "$@"; }
patched_lib() { ls -d /tmp/edge-cache/builds/"$PRESET"-*-patched-*/lib 2>/dev/null | tail -1; }
pack() { tar czf "$OUT/$1.tgz" -C "$(dirname "$2")" "$(basename "$2")"; }

step=${1:?step}; shift
case $step in
setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .carry/whl/*.whl || exit 1
    mkdir -p /tmp/llsrc && tar xzf .carry/llama-src.tgz -C /tmp/llsrc
    nvidia-smi --query-gpu=name,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
    edge build --preset "$PRESET" 2>&1 | tail -2
    ;;
stock)
    patched=$(patched_lib)
    # stock llama.cpp: the unpatched libllama compiled against the patched build's ggml (the patches
    # touch libllama only, and ggml's sources are the same), so both load the very same ggml files
    out=/tmp/edge-cache/builds/stock-on-$PRESET
    cmake -S /tmp/llsrc -B "$out/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DLLAMA_USE_SYSTEM_GGML=ON -Dggml_DIR="$patched/cmake/ggml" -DLLAMA_BUILD_COMMON=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF > /tmp/stock-build.log 2>&1 &&
        cmake --build "$out/build" --target llama -j "$(nproc)" >> /tmp/stock-build.log 2>&1 || {
        tail -20 /tmp/stock-build.log
        exit 1
    }
    mkdir -p "$out/lib" && ln -sf "$patched"/libggml*.so* "$out/lib/" && cp -a "$out/build/bin"/libllama.so* "$out/lib/"
    echo "patched $patched; stock $out/lib"
    ;;
part) cp "$@" /tmp/parts/ && ls -la /tmp/parts ;;
join)
    cat /tmp/parts/"$1".part-* > /tmp/models/"$1"
    echo "$2  /tmp/models/$1" | sha256sum -c - || exit 1
    ;;
modes)
    model=$1; shift
    dir=/tmp/results/modes-$(basename "$model" .gguf); mkdir -p "$dir"
    for mode in off lru top1 exact oracle; do
        cache=(); [ "$mode" = off ] || cache=(--mode "$mode" "$@")
        case $mode in top1 | exact) cache+=(--predictors "${PREDICTORS:-edge_preattn/onnx_models/edge-moe-default}") ;; esac
        EDGE_PREATTN_LIB=$(patched_lib) edge run -m "$model" --temp 0 -n 48 "${cache[@]}" \
            --stats-json "$dir/run-$mode.json" > "$dir/run-$mode.txt" 2> "$dir/run-$mode.err"
        echo "$mode: exit $?, text $(md5sum < "$dir/run-$mode.txt" | cut -c1-8);" \
            "$(grep -E 'decode|host synchron' "$dir/run-$mode.err" | tr '\n' ' ' | cut -c1-260)"
    done
    pack "$(basename "$dir")" "$dir"
    ;;
widen)
    stem=$(basename "$1" .gguf)
    [ -f "/tmp/models/$stem-wide.gguf" ] ||
        edge synth --widen-from "$1" --expert-bytes-like qwen3-30b-a3b -o "/tmp/models/$stem-wide.gguf"
    ;;
mps-probe) bash .carry/mps_probe.sh 2>&1 | tee "$OUT/mps-probe.log" ;;  # carried from shared/tools/device
bench)
    model=$1; shift
    name=$(basename "$model" .gguf)
    mkdir -p "/tmp/results/$name"
    EDGE_PREATTN_LIB=$(patched_lib) edge bench "$model" --stock-lib /tmp/edge-cache/builds/stock-on-$PRESET/lib -o "/tmp/results/$name" "$@" \
        2>&1 | tee -a "/tmp/results/$name/bench.log" | grep -v "^bench:"
    pack "results-$name" "/tmp/results/$name"
    ;;
test)
    EDGE_PREATTN_LIB=$(patched_lib) python3 -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest-gpu.log" |
        tail -15
    ;;
first)
    deadline=${1:-560}
    left() { echo $((deadline - SECONDS)); }
    model=/tmp/models/edge-moe-default-wide.gguf
    bash "$0" setup || exit 1
    bash "$0" widen edge_preattn/data/edge-moe-default.gguf
    echo "setup and widen done at ${SECONDS} s"
    for residency in token routing; do
        bash "$0" modes "$model" --slots 8 --copy-queue --residency "$residency" &&
            mv "$OUT/modes-edge-moe-default-wide.tgz" "$OUT/modes-$residency.tgz"
    done
    EDGE_PREATTN_GPU_TESTS=1 timeout $(($(left) > 300 ? 150 : $(left) / 2)) \
        bash "$0" test -m gpu tests/test_engine_counters.py tests/test_faults.py
    echo "tests done at ${SECONDS} s"
    [ "$(left)" -gt 150 ] || exit 0
    bash "$0" stock | tail -1
    timeout "$(left)" bash "$0" bench "$model" --predictors edge_preattn/onnx_models/edge-moe-default \
        --configs all-gpu,ngl,lru,lru+token,exact,exact+token,oracle,oracle+token --copy-queue \
        --rounds 2 -n 24 --vram-budget 25% -t 8
    [ -f "$OUT/results-edge-moe-default-wide.tgz" ] || pack results-partial /tmp/results/edge-moe-default-wide
    ;;
presets)
    src=/tmp/presets/llama.cpp
    rm -rf /tmp/presets && mkdir -p /tmp/presets
    python3 -c "import sys; from pathlib import Path; from edge_preattn.model import build
build.prepare_source(Path(sys.argv[1]), stock=False)" "$src" || exit 1
    patched='ggml-cuda\.dir/(ggml-cuda|mmf|mmid|mmq|mmvf|mmvq)\.cu\.o'
    for preset in "$@"; do
        (
            started=$(date +%s)
            cmake --preset "$preset" -B "/tmp/presets/$preset" -DEDGE_LLAMA_SOURCE="$src" > "/tmp/presets/$preset.log" 2>&1 &&
                objects=$(ninja -C "/tmp/presets/$preset" -t targets all | grep -oE "^[^:]*$patched") &&
                ninja -C "/tmp/presets/$preset" $objects >> "/tmp/presets/$preset.log" 2>&1
            echo "$preset: exit $? in $(($(date +%s) - started)) s, $(echo $objects | wc -w) objects"
        ) &
    done
    wait
    for preset in "$@"; do grep -E "error|FAILED" "/tmp/presets/$preset.log" | head -5; done
    ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
