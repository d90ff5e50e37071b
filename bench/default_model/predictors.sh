#!/usr/bin/env bash
# Re-create the default model's shipped predictors (edge_preattn/onnx_models/edge-moe-default/) with the
# project's own commands, on a CPU: prompts from ../shared/prompts/train.txt plus chunks of this machine's
# Python standard library and licence texts, a held-out prompt set cut from other files, collection
# (about 8 min on 2 busy cores with -t 1), training with the defaults (residual on the router prior,
# hidden 128, rank+distill) plus the three history inputs the library feeds (--features
# prev-layer,prev-token,prev-x: patch 17 feeds the first two, patch 22 prev-x) and longer optimization at
# a higher learning rate (--epochs 40 --patience 3 --lr 3e-3); the third input and those settings were
# chosen on validation prompts in bench/results/accuracy-push-edge-moe-default.md (about 4 min on one
# thread, layers 5 and 6 stop early at 18 and 12 epochs) and evaluation on the held-out traces.
#
# Why a script: the predictors are shipped beside the model, so the steps that made them must be repeatable.
# usage: bench/default_model/predictors.sh [PROMPTS] [WORK_DIR]   (PROMPTS default ../shared/prompts/train.txt)
set -euo pipefail
prompts=${1:-../shared/prompts/train.txt}
work_dir=${2:-/tmp/edge-moe-default-predictors}
model=edge_preattn/data/edge-moe-default.gguf
stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
mkdir -p "$work_dir"
python3 bench/make_prompts.py "$stdlib" /usr/share/common-licenses --split train --count 320 \
    -o "$work_dir/stdlib-train.jsonl"
python3 bench/make_prompts.py "$stdlib" /usr/share/common-licenses --split heldout --count 80 \
    -o "$work_dir/heldout.jsonl"
python3 - "$prompts" "$work_dir/stdlib-train.jsonl" "$work_dir/train.jsonl" <<'EOF'
import json, sys
lines = [l.replace("\\n", "\n") for l in open(sys.argv[1]).read().splitlines() if l.strip()]
with open(sys.argv[3], "w") as out:
    out.writelines(json.dumps({"text": t}) + "\n" for t in lines)
    out.writelines(open(sys.argv[2]))
EOF
edge-preattn collect "$model" --prompts "$work_dir/train.jsonl" -n 16 -o "$work_dir/traces" -t 1
edge-preattn collect "$model" --prompts "$work_dir/heldout.jsonl" -n 48 --seed 1000 -o "$work_dir/heldout" -t 1
edge-preattn train "$work_dir/traces" -o "$work_dir/preds" -t 1 --features prev-layer,prev-token,prev-x \
    --epochs 40 --patience 3 --lr 3e-3
edge-preattn eval "$work_dir/traces" "$work_dir/preds" --heldout "$work_dir/heldout" --calibrate \
    -o "$work_dir/eval" --name edge-moe-default
echo "to ship: copy $work_dir/preds/{*.onnx,predictors.json} and $work_dir/eval/{accuracy,calibration}-*.{md,json}"
echo "into edge_preattn/onnx_models/edge-moe-default/"
