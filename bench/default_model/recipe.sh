#!/usr/bin/env bash
# Re-create the package's default model (edge_preattn/default_model/*.gguf) on a machine with one CUDA GPU.
#
# Why a script: the model file is shipped, so the steps that made it must be repeatable; given the same machine
# text (the corpus) and seed, these steps give the same file up to GPU nondeterminism in training.
#
# usage: bench/default_model/recipe.sh OUT_DIR
# env (defaults in brackets):
#   REFERENCE_MOE_DIR  the reference recipe's tools, for build_corpus.py [../shared/tools/reference-moe]
#   LLAMA_CPP_DIR      llama.cpp source holding convert_hf_to_gguf.py, conversion/, gguf-py/ (llama-cpp-python 0.3.36
#                      sdist, vendor/llama.cpp) [.carry/default_model/llama]
#   TOKENIZER_DIR      GPT-2 tokenizer folder made by make_tokenizer.py; made here when missing
#                      [.carry/default_model/tokenizer]
#   TRAIN_TIME_S [230]  SEED [1]  WORK_DIR [/tmp/default_model_work]
#   SMOKE_TEST=1: a CPU check of the steps (a 3 MB corpus, 2 tiny training steps); the GGUF is then no model
set -euo pipefail
out_dir=${1:?usage: recipe.sh OUT_DIR}
reference_moe_dir=${REFERENCE_MOE_DIR:-../shared/tools/reference-moe}
llama_cpp_dir=${LLAMA_CPP_DIR:-.carry/default_model/llama}
tokenizer_dir=${TOKENIZER_DIR:-.carry/default_model/tokenizer}
train_time_s=${TRAIN_TIME_S:-230}
seed=${SEED:-1}
work_dir=${WORK_DIR:-/tmp/default_model_work}
corpus_args=()
train_args=()
if [ "${SMOKE_TEST:-0}" = 1 ]; then corpus_args=(--max-bytes 3000000); train_args=(--tiny --max-steps 2); fi
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1
mkdir -p "$out_dir" "$work_dir"

python3 -c 'import torch, transformers, tokenizers; print("torch", torch.__version__, "transformers",
transformers.__version__, "tokenizers", tokenizers.__version__, "cuda", torch.cuda.is_available())'
if [ ! -f "$tokenizer_dir/tokenizer.json" ]; then
  python3 "$reference_moe_dir/make_tokenizer.py" "$llama_cpp_dir" "$tokenizer_dir"
fi

# 1. corpus: the machine's own installed text, GPT-2 tokens (stats.json says what went in)
python3 "$reference_moe_dir/build_corpus.py" "$tokenizer_dir" "$work_dir/corpus" "${corpus_args[@]}" 2>&1 | tail -n 40 \
  | tee "$out_dir/corpus.log"
cp "$work_dir/corpus/stats.json" "$out_dir/corpus_stats.json"

# 2. train for a fixed wall-clock budget
python3 "$here/train_small_moe.py" --data "$work_dir/corpus" --tokenizer "$tokenizer_dir" --out "$work_dir/hf" \
  --seed "$seed" --time-s "$train_time_s" "${train_args[@]}" 2>&1 | tee "$out_dir/train.log"
cp "$work_dir/hf/train_summary.json" "$work_dir/hf/config.json" "$out_dir/"

# 3. convert with llama.cpp's own converter: q8_0 (norms and routers stay F32)
python3 "$llama_cpp_dir/convert_hf_to_gguf.py" "$work_dir/hf" --outtype q8_0 \
  --outfile "$out_dir/edge-moe-default.gguf" 2>&1 | tail -n 5 | tee "$out_dir/convert.log"
ls -l "$out_dir/edge-moe-default.gguf"
(cd "$out_dir" && sha256sum edge-moe-default.gguf | tee edge-moe-default.gguf.sha256)
