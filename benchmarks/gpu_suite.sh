#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md in one run, a few minutes on one H100 or H200:
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]
#
# 1. the environment (GPU, driver, versions);
# 2. the throughput table (benchmarks/throughput.py): JAX steps in float32 (default and
#    `highest` matmul precision) and bfloat16, JAX epochs over synthetic CIFAR-size data
#    with a profile of the bfloat16 epoch, and the PyTorch port's rows in a process of
#    their own (eager float32, bfloat16 autocast + channels_last, torch.compile, epochs
#    fed by host augmentation and by the reference's DataLoader);
# 3. with LCMT_DATA_DIR set, train.py in bfloat16 on that data (LCMT_DATASET, default
#    image_folder) for 15 epochs with evaluation and checkpoints every 5, and the
#    1000-epoch projection from its records (benchmarks/protocol_time.py);
# 4. with LCMT_BASELINE_DIR set (a checkout of an earlier commit), that commit's JAX step
#    rows, for a before/after on the same card.
#
# Everything is printed and kept under OUT_DIR (default gpu_suite_out). Python packages
# the host lacks (ml-collections on an image with JAX preinstalled) go on PYTHONPATH first.
# LCMT_PROFILE_DIR moves the profiler trace elsewhere. LCMT_BENCH_FLAGS and LCMT_TRAIN_FLAGS append flags to the throughput and train.py
# commands: a dry run on a CPU uses them to shrink the network and the steps.
set -uo pipefail
out=${1:-gpu_suite_out}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# JAX and the PyTorch child share the card: allocate on demand, not 75% at start.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
start=$SECONDS
stage() { echo; echo "=== $1 (at $((SECONDS - start)) s)"; }

stage environment
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
"$python" - <<'PY'
import importlib.metadata as md, platform
names = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'torch', 'torchvision')
print('python', platform.python_version(), ' '.join(
    f'{n} {md.version(n)}' for n in names if any(d.metadata['Name'] == n for d in md.distributions())))
import jax
print('jax devices:', jax.devices())
PY

stage 'throughput: JAX and PyTorch'
"$python" -m benchmarks.throughput --steps 200 --warmup 20 \
  --dtypes bfloat16,float32,float32-highest --epoch --epoch_dtypes bfloat16,float32 \
  --profile "${LCMT_PROFILE_DIR:-$out/profile}" --torch_compile_budget "${LCMT_COMPILE_BUDGET:-150}" \
  ${LCMT_BENCH_FLAGS:-} 2>&1 | tee "$out/throughput.txt"

if [[ -n "${LCMT_DATA_DIR:-}" ]]; then
  stage "train.py, bfloat16, ${LCMT_DATASET:-image_folder} in $LCMT_DATA_DIR"
  workdir=$(mktemp -d)/run
  train_start=$SECONDS
  "$python" train.py --config=configs/cifar10.py \
    --config.dataset="${LCMT_DATASET:-image_folder}" --config.data_dir="$LCMT_DATA_DIR" \
    --config.compute_dtype=bfloat16 --config.num_epochs=15 --config.progress_bar=False \
    --workdir="$workdir" ${LCMT_TRAIN_FLAGS:-} 2>&1 | tee "$out/train.txt"
  echo "train.py wall time $((SECONDS - train_start)) s" | tee -a "$out/train.txt"
  cp "$workdir/metrics.jsonl" "$workdir/summary.json" "$out/" 2>/dev/null
  "$python" -m benchmarks.protocol_time "$workdir" --epochs 1000 | tee -a "$out/train.txt"
fi
if [[ -n "${LCMT_BASELINE_DIR:-}" ]]; then
  stage "baseline: the JAX step rows of $LCMT_BASELINE_DIR"
  (cd "$LCMT_BASELINE_DIR" && "$python" -m benchmarks.throughput --skip_torch --steps 200 \
    --warmup 20 --dtypes bfloat16,float32 ${LCMT_BENCH_FLAGS:-}) 2>&1 | tee "$out/baseline.txt"
fi

stage done
