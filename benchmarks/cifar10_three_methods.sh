#!/usr/bin/env bash
# Full-width ConvLarge on CIFAR-10 image folders: MT+LC, Mean Teacher and the supervised
# baseline, one after the other, on the reference's schedule compressed to EPOCHS epochs
# (`configs/cifar10.py:epochs=N`), seed 0, batches of 32 + 128 (RESULTS.md, "one GPU"):
#
#   bash benchmarks/cifar10_three_methods.sh DATA OUT_DIR
#
# DATA is a folder with train/ and test/ class folders, or a .tgz holding them
# (../shared/data/cifar10-jpeg.tgz), unpacked to a temporary folder first. OUT_DIR gets
# seven files: train.log (everything printed, with `lcmt_jax.evaluate`'s errors and pair
# purity by quantile of each run's last checkpoint), runs.tgz (each run's config.json,
# split.json, metrics.jsonl and summary.json), report.md (`lcmt_jax.report`'s table, each
# method against Mean Teacher) and the figures of `lcmt_jax.plot` (learning curves, PCA of
# each run's best teacher).
# Environment:
#   EPOCHS       epochs of every run (default 80: the three runs, the report and the figures
#                take about 8 minutes on one H200, measured 2026-11-26)
#   METHODS      the runs to make (default "mt_lc mt supervised")
#   RUN_SECONDS  a run still going after this many seconds is stopped (default 240; its
#                records so far are kept), so the whole script ends within a known time
#   TRAIN_FLAGS  more train.py flags, e.g. a CPU dry run's
#                "--config.width=8 --config.compute_dtype=float32"
#   CONFIG       the config file and its arguments (default configs/cifar10.py; epochs=EPOCHS
#                is appended), e.g. "configs/cifar10_wrn.py:recipe=wrn" (benchmarks/wrn_runs.sh)
#   BRANCH       1 (default): Mean Teacher starts from the MT+LC run's checkpoint before
#                lc_start (`train.py --branch_from`, README "Branching a comparison") where
#                that run got there; 0: every run trains from the start
set -uo pipefail
data=${1:?usage: cifar10_three_methods.sh DATA OUT_DIR}
out=${2:?usage: cifar10_three_methods.sh DATA OUT_DIR}
epochs=${EPOCHS:-80}
config=${CONFIG:-configs/cifar10.py}
[[ $config == *:* ]] && config+=",epochs=$epochs" || config+=":epochs=$epochs"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
scratch=$(mktemp -d)
start=$SECONDS
data=$(bash benchmarks/image_folder.sh "$data" "$scratch") || exit 2
echo "image folder $data (at $((SECONDS - start)) s)" | tee -a "$out/train.log"

methods=(${METHODS:-mt_lc mt supervised})
train() {  # METHOD [train.py flags ...]: the exit status of train.py
  local method=$1
  shift
  timeout --signal=INT "${RUN_SECONDS:-240}" "$python" train.py \
    --config="$config" --config.method="$method" \
    --config.dataset=image_folder --config.data_dir="$data" --config.compute_dtype=bfloat16 \
    --config.eval_every_epochs=5 --config.checkpoint_every_epochs="$epochs" \
    --config.progress_bar=False --workdir="$scratch/$method" ${TRAIN_FLAGS:-} "$@" \
    2>&1 | tee -a "$out/train.log"
  return "${PIPESTATUS[0]}"
}
for method in "${methods[@]}"; do
  echo "=== $method, $epochs epochs (at $((SECONDS - start)) s)" | tee -a "$out/train.log"
  if [[ $method == mt && ${BRANCH:-1} == 1 && -d $scratch/mt_lc/checkpoints ]]; then
    # Refused (exit status 2, nothing written) where the MT+LC run stopped before the branch point.
    train mt --branch_from="$scratch/mt_lc" || { (( $? == 2 )) && train mt; }
  else
    train "$method"
  fi
done
runs=()  # Those that wrote records; a run that failed is left out of the table and figures.
for method in "${methods[@]}"; do
  [[ -s "$scratch/$method/metrics.jsonl" ]] && runs+=("$method")
done
(( ${#runs[@]} )) || { echo "no run wrote any records" | tee -a "$out/train.log"; exit 1; }
tar czf "$out/runs.tgz" -C "$scratch" --ignore-failed-read \
  "${runs[@]/%//config.json}" "${runs[@]/%//split.json}" "${runs[@]/%//metrics.jsonl}" \
  "${runs[@]/%//summary.json}"
(cd "$scratch" && "$python" -m lcmt_jax.report "${runs[@]}" --against=mt) 2>&1 | tee "$out/report.md"
for run in "${runs[@]}"; do  # Errors and the pair purity by quantile of each run's last checkpoint.
  echo "=== evaluate $run (at $((SECONDS - start)) s)" | tee -a "$out/train.log"
  "$python" -m lcmt_jax.evaluate --workdir="$scratch/$run" --checkpoint=latest 2>&1 \
    | awk 'NR == 1, /^$/; /^pair purity/, 0' | tee -a "$out/train.log"
done
echo "=== figures (at $((SECONDS - start)) s)" | tee -a "$out/train.log"
"$python" -m lcmt_jax.plot --workdir="${runs[@]/#/$scratch/}" --out="$out" 2>&1 \
  | tee -a "$out/train.log"
echo "=== done at $((SECONDS - start)) s" | tee -a "$out/train.log"
