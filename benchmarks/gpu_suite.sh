#!/usr/bin/env bash
# The GPU checks in one run (at most ~8 minutes on one GPU), figures written to OUT_DIR:
#
#   bash benchmarks/gpu_suite.sh OUT_DIR            # on a machine with a CUDA GPU
#   bash benchmarks/gpu_suite.sh OUT_DIR --dry-run  # the same steps on CPU, small and quick
#
# 1. device.txt           nvidia-smi and torch's view of the device
# 2. official_parity.*    our step against the official engine.train on CUDA (CPU and CUDA fp16
#                         kernels differ, so the comparison is within the device); needs the
#                         official checkouts: CLIPOOD_OFFICIAL_DIR / OPENAI_CLIP_DIR, default
#                         .ext/thuml+CLIPood and .ext/openai+CLIP (skipped, and said so, if absent)
# 3. bench_core_*.json    MMSLoss vs CE and one BMA update, ViT-B/16 tower in bf16 and official fp16
# 4. bench_recipe_*.json  a full ViT-B/16 step, CE vs MMS + BMA: clean bf16 and official numerics
# Each step's log is OUT_DIR/<step>.log; summary.txt lists what ran and how each ended.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: gpu_suite.sh OUT_DIR [--dry-run]}"
dry=0
[ "${2:-}" = "--dry-run" ] && dry=1
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: "${CLIPOOD_OFFICIAL_DIR:=$PWD/.ext/thuml+CLIPood}" "${OPENAI_CLIP_DIR:=$PWD/.ext/openai+CLIP}"
export CLIPOOD_OFFICIAL_DIR OPENAI_CLIP_DIR
if [ $dry = 1 ]; then
  device=cpu; parity_steps=4; quick=--quick; batch=4; step_model=clipood-tiny
else
  device=cuda; parity_steps=60; quick=; batch=64; step_model=ViT-B-16
fi
summary="$out/summary.txt"
echo "gpu_suite $(date -u +%FT%TZ) device=$device dry_run=$dry" >"$summary"

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record the exit status and the time
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$summary"
}

{ nvidia-smi 2>&1 || echo "no nvidia-smi"; python -c "import torch; print(torch.__version__, torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"; } >"$out/device.txt" 2>&1

if [ -f "$CLIPOOD_OFFICIAL_DIR/engine.py" ] && [ -f "$OPENAI_CLIP_DIR/clip/model.py" ]; then
  step official_parity 240 python benchmarks/official_parity.py --device "$device" --steps "$parity_steps" \
    --json "$out/official_parity.json"
else
  echo "official_parity skipped: no checkout at $CLIPOOD_OFFICIAL_DIR / $OPENAI_CLIP_DIR" | tee -a "$summary"
fi
for dtype in bf16 official; do
  step "bench_core_$dtype" 120 python benchmarks/bench_core.py --device "$device" --dtype "$dtype" $quick \
    --json "$out/bench_core_$dtype.json"
done
step bench_recipe_clean_bf16 120 python benchmarks/bench_recipe.py --device "$device" --amp bf16 --skip-loader \
  --model "$step_model" --batch "$batch" $quick --json "$out/bench_recipe_clean_bf16.json"
step bench_recipe_official 120 python benchmarks/bench_recipe.py --device "$device" --numerics official \
  --skip-loader --model "$step_model" --batch "$batch" $quick --json "$out/bench_recipe_official.json"
cat "$summary"
! grep -q "rc=[1-9]" "$summary"
