#!/usr/bin/env bash
# WRN-28-2 on CIFAR-10 image folders (issue 32, point 5): MT+LC, Mean Teacher and the supervised
# baseline with configs/cifar10_wrn.py, 4,000 labels, the schedule compressed to EPOCHS epochs,
# seed 0, batches of 32 + 128, bfloat16; the table of `lcmt_jax.report` in OUT_DIR/report.md,
# to set beside Oliver et al.'s 15.87 % and MixMatch's 10.36 % (Mean Teacher, WRN-28-2):
#
#   bash benchmarks/wrn_runs.sh DATA OUT_DIR
#
# DATA and OUT_DIR are those of benchmarks/cifar10_three_methods.sh, which does the work
# (its header lists what OUT_DIR gets). LC's threshold is each unlabelled batch's 10 %
# quantile of the feature distances (`--config.lc_threshold_quantile=0.1`): the reference's
# T = 50 was set for ConvLarge's features, not WRN's; Mean Teacher and the supervised run
# have no LC term, so the flag changes nothing there.
# Environment (and those of cifar10_three_methods.sh: METHODS, TRAIN_FLAGS, PYTHON):
#   RECIPE       'wrn' (default: SGD lr 0.03, weight decay 5e-4 on kernels, cosine) or
#                'reference' (configs/cifar10_wrn.py's docstring sets them side by side)
#   EPOCHS       epochs of every run (default 80)
#   RUN_SECONDS  a run still going after this many seconds is stopped, its records kept
#                (default 900; not yet measured on a GPU)
# CPU dry run on a fake folder of 12 + 3 images a class (171 s on 2 AMD EPYC cores, width 8,
# one epoch each):
#   EPOCHS=1 TRAIN_FLAGS="--config.width=8 --config.compute_dtype=float32 \
#     --config.labeled_per_class=2 --config.labeled_batch_size=10 \
#     --config.unlabeled_batch_size=40 --config.eval_batch_size=30" \
#     bash benchmarks/wrn_runs.sh FOLDER /tmp/wrn_out
set -uo pipefail
export CONFIG="configs/cifar10_wrn.py:recipe=${RECIPE:-wrn}"
export TRAIN_FLAGS="--config.lc_threshold_quantile=0.1 ${TRAIN_FLAGS:-}"
export RUN_SECONDS=${RUN_SECONDS:-900}
exec bash "$(dirname "$0")/cifar10_three_methods.sh" "$@"
