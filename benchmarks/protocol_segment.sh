#!/usr/bin/env bash
# One time-limited segment of a long run (RESULTS.md, "the full protocol in segments"): the
# reference's 1,000-epoch CIFAR-10 protocol takes about 22 minutes on one H200 in bf16, more
# than a lease of the project's GPU machines, where nothing on the machine outlives the lease.
#
#   bash benchmarks/protocol_segment.sh DATA PARTS OUT SECONDS [train.py flags]
#
# DATA is a folder with train/ and test/ class folders, or a .tgz holding them
# (../shared/data/cifar10-jpeg.tgz). PARTS is the folder of an earlier segment's
# run.tar.part-* files (absent or empty: a new run). The run resumes from them, trains for
# SECONDS (then train.py is interrupted; at most the epochs since its last checkpoint, 5
# by default, are lost), and OUT gets the run again as run.tar.part-* of at most 15 MiB
# each (records, tensorboard, and the two checkpoints the run keeps: the latest, to resume
# from, and the best, for `lcmt_jax.evaluate`; about 35 MB each at width 128), the
# run's metrics.jsonl and everything printed (train.log): carry OUT's parts as PARTS of
# the next segment. Environment: CONFIG (default configs/cifar10.py, the faithful MT+LC
# run), PYTHON (python3). Changing the config between segments needs --allow_config_change
# among the flags.
set -uo pipefail
(( $# >= 4 )) || { echo "usage: protocol_segment.sh DATA PARTS OUT SECONDS [train.py flags]" >&2; exit 2; }
data=$1 parts=$2 out=$3 seconds=$4
shift 4
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
start=$SECONDS
data=$(bash benchmarks/image_folder.sh "$data" "$scratch") || exit 2
echo "image folder $data (at $((SECONDS - start)) s)" | tee -a "$out/train.log"
run="$scratch/run"
mkdir -p "$run"
if compgen -G "$parts/run.tar.part-*" > /dev/null; then
  cat "$parts"/run.tar.part-* | tar xf - -C "$run" || exit 2
  echo "carried run with checkpoint(s) $(ls "$run/checkpoints" | tr '\n' ' ')" | tee -a "$out/train.log"
fi
timeout --kill-after=60 --signal=INT "$seconds" "$python" train.py --config="${CONFIG:-configs/cifar10.py}" \
  --config.dataset=image_folder --config.data_dir="$data" --config.compute_dtype=bfloat16 \
  --config.progress_bar=False --workdir="$run" "$@" 2>&1 | grep --line-buffered -v cuda_timer \
  | tee -a "$out/train.log"
ls "$run/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' > /dev/null || { echo "no checkpoint was written: nothing to carry" | tee -a "$out/train.log"; exit 1; }
# The epochs of the latest and the best checkpoint, as the run's checkpoint manager reads them.
kept=($("$python" -c '
import sys
from lcmt_jax import checkpointing
checkpoints = checkpointing.RunCheckpoints(sys.argv[1], read_only=True)
print(*sorted({checkpoints.epoch_of(kind) for kind in checkpointing.KINDS} - {None}))
checkpoints.close()
' "$run" 2>>"$out/train.log")) || { echo "cannot read the run's checkpoints" | tee -a "$out/train.log"; exit 1; }
echo "packing the run with checkpoint(s) ${kept[*]} (latest and best; at $((SECONDS - start)) s)" \
  | tee -a "$out/train.log"
records=$(cd "$run" && ls | grep -v '^checkpoints$')
tar cf - -C "$run" $records "${kept[@]/#/checkpoints/}" | split -b 15M - "$out/run.tar.part-" \
  || exit 1
cp "$run/metrics.jsonl" "$out/"
