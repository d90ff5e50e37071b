#!/usr/bin/env bash
# Re-create the default model's shipped predictors (edge_preattn/onnx_models/edge-moe-default/) with the
# project's own commands, on a CPU (about 7 min collection + 11 min training on 2 busy cores).
#
# Why a script: the predictors are shipped beside the model, so the steps that made them must be repeatable.
# usage: bench/default_model/predictors.sh [PROMPTS] [WORK_DIR]   (PROMPTS default ../shared/prompts/train.txt)
set -euo pipefail
prompts=${1:-../shared/prompts/train.txt}
work_dir=${2:-/tmp/edge-moe-default-predictors}
model=edge_preattn/data/edge-moe-default.gguf
edge-preattn collect "$model" --prompts "$prompts" -o "$work_dir/traces" -t 2
edge-preattn train "$work_dir/traces" --hidden 512 -o "$work_dir/preds"
edge-preattn eval "$work_dir/traces" "$work_dir/preds" --calibrate -o "$work_dir/eval" --name edge-moe-default
echo "to ship: copy $work_dir/preds/{*.onnx,predictors.json} and $work_dir/eval/{accuracy,calibration}-*.{md,json}"
echo "into edge_preattn/onnx_models/edge-moe-default/"
