"""Figures of finished runs: learning curves and a 2-D projection of the teacher's features.

    python -m lcmt_jax.plot --workdir=RUN_A [RUN_B ...] --out=FIGDIR [--tsne] [--checkpoint=best]

`learning_curves.png` overlays every run: each loss term, the fraction of
pairs inside the local-clustering threshold (`lc_within_lu`, `lc_within_uu`)
and the threshold itself, the pair purity of those pairs beside its base rate
(dashed) in training and at each evaluation, the student's median pairwise
feature distance and the student's and teacher's error at each evaluation.
`pca_<run>.png` (and `tsne_<run>.png` with --tsne) scatter the teacher's
feature vectors of the test images, coloured by class.
"""

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from lcmt_jax import cli  # pylint: disable=wrong-import-position
from lcmt_jax import errors  # pylint: disable=wrong-import-position
from lcmt_jax import metrics_log  # pylint: disable=wrong-import-position

# (record kind, key, panel title, key of a reference curve drawn dashed or None); panels a
# run has no values for are left out.
PANELS = (
    ('train', 'loss', 'total loss', None),
    ('train', 'ce_loss', 'cross-entropy', None),
    ('train', 'consistency_loss', 'consistency loss', None),
    ('train', 'lc_loss', 'local-clustering loss', None),
    ('train', 'lc_within_lu', 'LC: labelled-unlabelled pairs within T', None),
    ('train', 'lc_within_uu', 'LC: unlabelled-unlabelled pairs within T', None),
    ('train', 'lc_threshold', 'LC threshold T', None),
    ('train', 'lc_purity_lu', 'LC pair purity, labelled-unlabelled\n(dashed: base rate)',
     'lc_base_rate_lu'),
    ('train', 'lc_purity_uu', 'LC pair purity, unlabelled-unlabelled\n(dashed: base rate)',
     'lc_base_rate_uu'),
    ('train', 'lc_weighted_purity_lu',
     'LC pair purity weighted as the loss pulls,\nlabelled-unlabelled (dashed: base rate)',
     'lc_base_rate_lu'),
    ('train', 'lc_weighted_purity_uu',
     'LC pair purity weighted as the loss pulls,\nunlabelled-unlabelled (dashed: base rate)',
     'lc_base_rate_uu'),
    ('eval', 'validation/student_pair_purity',
     'pair purity within T (validation)\n(dashed: base rate)', 'validation/student_pair_base_rate'),
    ('eval', 'test/student_pair_purity', 'pair purity within T (test)\n(dashed: base rate)',
     'test/student_pair_base_rate'),
    ('eval', 'validation/student_distance_q50', 'median feature distance (validation)', None),
    ('eval', 'test/student_distance_q50', 'median feature distance (test)', None),
    ('eval', 'test/student_accuracy', 'student test error (%)', None),
    ('eval', 'test/teacher_accuracy', 'teacher test error (%)', None),
    ('eval', 'validation/student_accuracy', 'student validation error (%)', None),
    ('eval', 'validation/teacher_accuracy', 'teacher validation error (%)', None),
)
_DPI = 80


class NoMetricsError(errors.UserInputError):
  """A workdir holds no metrics.jsonl."""


def run_labels(workdirs: Sequence[str]) -> list[str]:
  """Each run's workdir basename; the whole path where two basenames are equal."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return [name if names.count(name) == 1 else os.path.normpath(w)
          for name, w in zip(names, workdirs)]


def _curve(records: list[dict], kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  points = [(r['epoch'], r[key]) for r in records if r['kind'] == kind and key in r]
  epochs, values = (np.asarray(v, float) for v in zip(*points)) if points else (
      np.zeros(0), np.zeros(0))
  if key.endswith('_accuracy'):
    values = 100.0 * (1.0 - values)
  return epochs, values


def available_panels(runs: Sequence[list[dict]]) -> list[tuple]:
  """The entries of `PANELS` that at least one run's records have values for."""
  return [panel for panel in PANELS
          if any(_curve(records, panel[0], panel[1])[0].size for records in runs)]


def plot_learning_curves(workdirs: Sequence[str], path: str) -> str:
  """One panel per metric in `PANELS`, every run overlaid; returns `path`."""
  runs = []
  for workdir in workdirs:
    metrics_path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.isfile(metrics_path):
      raise NoMetricsError(f'{workdir} holds no metrics.jsonl: is it a run workdir?')
    runs.append(metrics_log.read_records(metrics_path))
  labels = run_labels(workdirs)
  panels = available_panels(runs)
  columns = min(4, len(panels))
  rows = -(-len(panels) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False)
  for ax, (kind, key, title, reference_key) in zip(axes.flat, panels):
    for records, label, color in zip(runs, labels, plt.cm.tab10.colors * 10):
      epochs, values = _curve(records, kind, key)
      if epochs.size:
        ax.plot(epochs, values, label=label, color=color,
                marker='o' if kind == 'eval' or epochs.size == 1 else None, markersize=3,
                linewidth=1.2)
      epochs, values = _curve(records, kind, reference_key) if reference_key else ((), ())
      if len(epochs):
        ax.plot(epochs, values, color=color, linestyle='--', linewidth=1.0)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel('epoch', fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis('off')
  legend = {}  # Label -> handle, over every panel: a run may lack some metrics.
  for ax in axes.flat:
    for handle, name in zip(*ax.get_legend_handles_labels()):
      legend.setdefault(name, handle)
  names = [name for name in labels if name in legend]
  handles = [legend[name] for name in names]
  fig.legend(handles, names, loc='lower center', ncol=min(len(names), 5), fontsize=8,
             frameon=False)
  fig.tight_layout(rect=(0, 0.06 if rows > 1 else 0.1, 1, 1))
  return _save(fig, path)


def project_pca(features: np.ndarray) -> np.ndarray:
  """The first two principal components of `features` (N, D), via the SVD of the centred data."""
  centred = features - features.mean(axis=0)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  return centred @ vt[:2].T


def project_tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
  from sklearn import manifold  # pylint: disable=import-outside-toplevel
  perplexity = min(30.0, (len(features) - 1) / 3)
  return manifold.TSNE(n_components=2, perplexity=perplexity, init='pca',
                       random_state=seed).fit_transform(features)


def plot_projection(points: np.ndarray, labels: np.ndarray, title: str, path: str) -> str:
  """A scatter of 2-D `points` coloured by class; returns `path`."""
  fig, ax = plt.subplots(figsize=(4.8, 4.2))
  for c in np.unique(labels):
    chosen = labels == c
    ax.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.7, label=str(c),
               color=plt.cm.tab10.colors[int(c) % 10], linewidths=0)
  ax.set_title(title, fontsize=9)
  ax.tick_params(labelsize=7)
  ax.legend(title='class', fontsize=7, title_fontsize=7, markerscale=2, loc='center left',
            bbox_to_anchor=(1.0, 0.5), frameon=False)
  fig.tight_layout()
  return _save(fig, path)


def plot_feature_projections(workdir: str, label: str, out_dir: str, *, checkpoint: str = 'best',
                             tsne: bool = False) -> list[str]:
  """PCA (and t-SNE) of the teacher's test-set features of one run; returns the written paths."""
  from lcmt_jax import evaluate  # pylint: disable=import-outside-toplevel  # Loads JAX.
  evaluable = evaluate.restore_run(workdir, checkpoint)
  predictions = evaluable.predict('test')
  features = np.asarray(predictions['teacher_features'], np.float64)
  labels = evaluable.labels('test')
  error = 100 * np.mean(predictions['teacher'] != labels)
  what = (f'{label}: teacher features, {len(labels)} test images\n'
          f'{checkpoint} checkpoint, teacher error {error:.2f}%')
  paths = [plot_projection(project_pca(features), labels, f'PCA of {what}',
                           os.path.join(out_dir, f'pca_{label}.png'))]
  if tsne:
    paths.append(plot_projection(project_tsne(features, evaluable.config.seed), labels,
                                 f't-SNE of {what}', os.path.join(out_dir, f'tsne_{label}.png')))
  return paths


def make_figures(workdirs: Sequence[str], out_dir: str, *, checkpoint: str = 'best',
                 projection: bool = True, tsne: bool = False) -> list[str]:
  """Every figure of `workdirs` into `out_dir`; returns the written paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [plot_learning_curves(workdirs, os.path.join(out_dir, 'learning_curves.png'))]
  if projection:
    for workdir, label in zip(workdirs, run_labels(workdirs)):
      paths += plot_feature_projections(workdir, label.replace(os.sep, '_'), out_dir,
                                        checkpoint=checkpoint, tsne=tsne)
  return paths


def _save(fig, path: str) -> str:
  fig.savefig(path, dpi=_DPI)
  plt.close(fig)
  return path


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_multi_string('workdir', None, 'Run directories to plot (more may follow the flag).')
  flags.DEFINE_string('out', None, 'Directory for the PNG files.')
  flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'],
                    'The checkpoint whose teacher features are projected.')
  flags.DEFINE_bool('projection', True, 'Also draw the PCA projection of the teacher features.')
  flags.DEFINE_bool('tsne', False, 'Also draw a t-SNE projection (slower).')


def main(argv: list[str], _) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  # `--workdir=A B C`: the words after the flag are more workdirs.
  workdirs = list(flags.FLAGS.workdir or []) + argv[1:]
  if not workdirs:
    raise errors.UserInputError('give at least one --workdir=DIR')
  if not flags.FLAGS.out:
    raise errors.UserInputError('give --out=FIGDIR, the directory for the PNG files')
  for path in make_figures(workdirs, flags.FLAGS.out, checkpoint=flags.FLAGS.checkpoint,
                           projection=flags.FLAGS.projection, tsne=flags.FLAGS.tsne):
    print(f'wrote {path} ({os.path.getsize(path) // 1024} KiB)', flush=True)


if __name__ == '__main__':
  cli.run(main, _define_flags)
