# Source on the GPU machine (no network): installs the carried wheels, points the build at the carried
# llama.cpp source and the cache at /tmp, and reassembles moe-ref-a from carried parts when complete.
#   carry: .carry/whl .carry/llama-src.tgz [.carry/moe-ref-a.part-*]
set -u
if [ ! -d /tmp/site ]; then  # once per warm machine: later calls need not carry the wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .carry/whl/*.whl || { echo "wheel install failed"; return 1; }
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export EDGE_PREATTN_CACHE=/tmp/edge-cache
# The image's CC/CXX (/opt/gcc) link libstdc++ statically into every shared library; two copies of
# libstdc++ in one process crash llama.cpp at model load. The system compilers link it dynamically.
unset CC CXX
if [ ! -f /tmp/llsrc/src/llama.cpp ] && [ -f .carry/llama-src.tgz ]; then
    mkdir -p /tmp/llsrc && tar xzf .carry/llama-src.tgz -C /tmp/llsrc
fi
export EDGE_PREATTN_LLAMA_SOURCE=/tmp/llsrc
for part in .carry/moe-ref-a.part-*; do [ -f "$part" ] && cp "$part" /tmp/; done
if [ -f /tmp/moe-ref-a.part-aa ] && [ -f /tmp/moe-ref-a.part-ab ] && [ ! -f /tmp/moe-ref-a.gguf ]; then
    cat /tmp/moe-ref-a.part-aa /tmp/moe-ref-a.part-ab > /tmp/moe-ref-a.gguf
fi
if [ -f /tmp/moe-ref-a.gguf ]; then
    echo "e8e4884eb661591b6508a075dc6489de995b4d0b33a352648e443240618033ca  /tmp/moe-ref-a.gguf" | sha256sum -c -
fi
edge() { python3 -m edge_preattn.cli "$@"; }
if [ -f /tmp/moe-ref-a.gguf ]; then
    mkdir -p /tmp/shared/models && ln -sf /tmp/moe-ref-a.gguf /tmp/shared/models/moe-ref-a.gguf
    export EDGE_PREATTN_SHARED=/tmp/shared
fi
