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
# 4. with LCMT_BEFORE=<commit> (needs .git; exported with `git archive`) or LCMT_BASELINE_DIR
#    (a copy of an earlier tree made beforehand, e.g. `git archive C | tar x -C DIR`, carried
#    along where the GPU host gets no .git), before/after on the same card: the JAX step and
#    epoch rows of both trees, run alternately (before, after, before, after:
#    LCMT_COMPARE_ROUNDS rounds, flags LCMT_COMPARE_FLAGS), side by side with the ratio, and
#    the benchmarks/hlo_passes.py totals of both trees (the current tree's script, copied
#    into the earlier tree when it lacks one);
# 5. unless LCMT_PARITY=0, the PyTorch parity tests (tests/test_torch_parity.py) with JAX on
#    this backend, float32, at the default matmul precision and at `highest`.
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
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
else
  echo 'nvidia-smi: not found (no NVIDIA driver here)'
fi
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
before=${LCMT_BASELINE_DIR:-}
if [[ -z "$before" && -n "${LCMT_BEFORE:-}" ]]; then
  before=$(mktemp -d)/before
  mkdir -p "$before"
  git archive "$LCMT_BEFORE" | tar x -C "$before" || { echo "cannot export $LCMT_BEFORE"; before=''; }
fi
if [[ -n "$before" ]]; then
  stage "before/after: $before against $PWD"
  if [[ ! -f "$before/benchmarks/hlo_passes.py" ]]; then
    cp benchmarks/hlo_passes.py "$before/benchmarks/" && echo "(copied benchmarks/hlo_passes.py into $before)"
  fi
  compare_flags=${LCMT_COMPARE_FLAGS:---steps 200 --warmup 20 --dtypes bfloat16,float32 --epoch --epoch_dtypes bfloat16}
  for round in $(seq "${LCMT_COMPARE_ROUNDS:-2}"); do
    for side in before after; do
      tree=$PWD; [[ $side == before ]] && tree=$before
      echo "--- $side, round $round"
      (cd "$tree" && "$python" -m benchmarks.throughput --skip_torch $compare_flags \
        ${LCMT_BENCH_FLAGS:-}) > "$out/compare_${side}_$round.txt" 2>&1
      grep -E '^JAX (step|epoch) ' "$out/compare_${side}_$round.txt" || tail -5 "$out/compare_${side}_$round.txt"
    done
  done
  for side in before after; do
    tree=$PWD; [[ $side == before ]] && tree=$before
    if [[ -f "$tree/lcmt_jax/experiment.py" ]]; then  # hlo_passes builds runs with it.
      (cd "$tree" && "$python" -m benchmarks.hlo_passes --dtype bfloat16 ${LCMT_HLO_FLAGS:-}) \
        > "$out/hlo_passes_$side.txt" 2>&1
    else
      echo "(a tree older than lcmt_jax/experiment.py: no pass counts)" > "$out/hlo_passes_$side.txt"
    fi
  done
  "$python" - "$out" <<'PY' | tee "$out/compare.txt"
import glob, os, re, statistics, sys
out = sys.argv[1]
row = re.compile(r'^(JAX (?:step|epoch) [\w ]+?)\s+([\d.]+|n/a)\s+([\d.]+|n/a)\s')
times = {}  # (row, side) -> ms/step of each round
for side in ('before', 'after'):
  for path in sorted(glob.glob(os.path.join(out, f'compare_{side}_*.txt'))):
    for line in open(path):
      m = row.match(line)
      if m and m.group(3) != 'n/a':
        times.setdefault((m.group(1), side), []).append(float(m.group(3)))
names = list(dict.fromkeys(name for name, _ in times))
print(f'{"":26}{"before ms/step":>22}{"after ms/step":>22}{"before/after":>14}')
for name in names:
  b, a = times.get((name, 'before'), []), times.get((name, 'after'), [])
  cell = lambda v: ' '.join(f'{x:.2f}' for x in v) or 'n/a'
  ratio = f'{statistics.median(b) / statistics.median(a):.2f}x' if a and b else 'n/a'
  print(f'{name:26}{cell(b):>22}{cell(a):>22}{ratio:>14}')
print('(each round\'s figure; the ratio of the medians: above 1 the current tree is faster)')
for side in ('before', 'after'):
  text = open(os.path.join(out, f'hlo_passes_{side}.txt')).read()
  totals = text.split('totals per step:')
  print(f'\nhlo_passes, bfloat16, {side}:' + (totals[1] if len(totals) > 1 else '\n' + text[-600:]))
PY
fi

if [[ "${LCMT_PARITY:-1}" != 0 ]]; then
  for precision in default highest; do
    stage "PyTorch parity tests, float32, JAX matmul precision $precision"
    (if [[ $precision == highest ]]; then export JAX_DEFAULT_MATMUL_PRECISION=highest; fi
     "$python" -m pytest -q -p no:cacheprovider tests/test_torch_parity.py) 2>&1 \
      | tee "$out/parity_$precision.txt" | tail -25
  done
fi

stage done
