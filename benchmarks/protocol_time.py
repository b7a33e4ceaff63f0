"""The full protocol's wall time, projected from a short `train.py` run's own records.

    python -m benchmarks.protocol_time WORKDIR [--epochs 1000]

Every `metrics.jsonl` record carries the wall time at which it was written. A
train record is written as soon as an epoch's training calls return, so
between two train records with no evaluation or checkpoint between them lies
exactly one epoch of training (batch sampling, augmentation, the steps and the
per-call metrics copy included), and a span of `eval_every_epochs` epochs
that ends with an evaluation and a checkpoint adds their cost. The projection
is `epochs x epoch + (epochs / every) x (evaluation + checkpoint)`; start-up
and compilation are left out (paid once; `train.py` prints them separately).
"""

import argparse
import json
import os
import statistics

from lcmt_jax import metrics_log


def epoch_costs(workdir: str) -> dict[str, float]:
  """Seconds of one training epoch (median) and of one evaluation + checkpoint (the last span)."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  every = config['eval_every_epochs']
  if config['checkpoint_every_epochs'] != every:
    raise ValueError('the projection needs evaluations and checkpoints at the same epochs')
  train = {r['epoch']: r['wall_time'] for r in metrics_log.read_records(
      os.path.join(workdir, 'metrics.jsonl')) if r['kind'] == 'train'}
  # Epoch 1 holds the compilation; an epoch after an evaluation holds that evaluation.
  plain = [train[e] - train[e - 1] for e in train if e - 1 in train and e > 2 and (e - 1) % every]
  spans = [train[e + every] - train[e] for e in train if e % every == 0 and e + every in train]
  if not plain or not spans:
    raise ValueError(f'{workdir} needs at least {2 * every + 1} epochs (a full span of '
                     f'{every} after the first evaluation)')
  epoch = statistics.median(plain)
  return {'epoch_seconds': epoch, 'every': every,
          'eval_and_checkpoint_seconds': spans[-1] - every * epoch}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdir')
  parser.add_argument('--epochs', type=int, default=1000)
  args = parser.parse_args(argv)
  costs = epoch_costs(args.workdir)
  total = (args.epochs * costs['epoch_seconds']
           + args.epochs / costs['every'] * costs['eval_and_checkpoint_seconds'])
  print(f'{args.workdir}: one training epoch {costs["epoch_seconds"]:.2f} s (median), evaluation '
        f'+ checkpoint every {costs["every"]} epochs {costs["eval_and_checkpoint_seconds"]:.2f} s; '
        f'{args.epochs} epochs: {total:.0f} s = {total / 60:.1f} min')


if __name__ == '__main__':
  main()
