#!/usr/bin/env bash
# Every method with every seed on one config, then the report and the figures:
#
#   bash benchmarks/methods_by_seeds.sh CONFIG OUT_DIR [train.py flags ...]
#
# e.g. the CPU protocol of RESULTS.md ("CIFAR-10 (JPEG q75) on a 2-core CPU"):
#
#   bash benchmarks/methods_by_seeds.sh configs/cifar10_cpu.py runs/cifar10_cpu \
#     --config.data_dir=/path/to/cifar10-jpeg
#
# Each run trains in OUT_DIR/<method>_seed<seed>; running the same command again
# resumes the runs that were interrupted and leaves finished ones as they are. Then
# OUT_DIR/report.md gets `lcmt_jax.report`'s table of all runs (each method against Mean
# Teacher, seed by seed), and OUT_DIR/figures the learning curves of the first seed's runs
# and the PCA of their best teachers.
# Mean Teacher starts from the MT+LC run of its seed at the epoch before lc_start
# (`train.py --branch_from`, README "Branching a comparison") where that run got there.
# Environment: METHODS (default "mt_lc mt supervised"), SEEDS (default "0 1 2"),
# PYTHON (default python3), BRANCH (1, the default, branches; 0 trains every run from the start).
set -euo pipefail
config=${1:?usage: methods_by_seeds.sh CONFIG OUT_DIR [train.py flags ...]}
out=${2:?usage: methods_by_seeds.sh CONFIG OUT_DIR [train.py flags ...]}
shift 2
python=${PYTHON:-python3}
methods=(${METHODS:-mt_lc mt supervised})
seeds=(${SEEDS:-0 1 2})
export PYTHONUNBUFFERED=1
mkdir -p "$out"
for seed in "${seeds[@]}"; do
  for method in "${methods[@]}"; do
    workdir="$out/${method}_seed$seed"
    if [[ -s "$workdir/summary.json" ]]; then
      echo "=== $workdir: finished before"
      continue
    fi
    echo "=== $workdir ($(date +%T))"
    start=$SECONDS
    train=("$python" train.py --config="$config" --config.method="$method" --config.seed="$seed"
           --config.progress_bar=False --workdir="$workdir" "$@")
    source_run="$out/mt_lc_seed$seed"
    if [[ $method == mt && ${BRANCH:-1} == 1 && ! -e $workdir && -d $source_run/checkpoints ]]; then
      # Refused (exit status 2, nothing written) where the MT+LC run stopped before the branch point.
      "${train[@]}" --branch_from="$source_run" || { status=$?; (( status == 2 )) || exit $status
                                                     "${train[@]}"; }
    else
      "${train[@]}"
    fi
    echo "=== $workdir: $((SECONDS - start)) s of wall time"
  done
done
"$python" -m lcmt_jax.report "$out" --against=mt --out="$out/report.md"
first=("${methods[@]/#/$out/}")
"$python" -m lcmt_jax.plot --workdir="${first[@]/%/_seed${seeds[0]}}" --out="$out/figures"
