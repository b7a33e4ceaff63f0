"""Loss terms of Mean Teacher with Local Clustering (docs/reference.md "Losses").

All are pure functions of arrays and run under `jit`; they compute in float32
whatever the network's compute dtype.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy of integer `labels`."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def softmax_mse_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Mean over batch and classes of `(softmax(student) - softmax(teacher))^2`.

  The teacher side is a target: no gradient flows into it.
  """
  student = jax.nn.softmax(student_logits.astype(jnp.float32), axis=-1)
  teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
  return jnp.mean((student - teacher) ** 2)


def consistency_loss(student_labeled: jax.Array, teacher_labeled: jax.Array,
                     student_unlabeled: jax.Array, teacher_unlabeled: jax.Array) -> jax.Array:
  """The reference's batch-size-weighted mean of the labelled and unlabelled softmax MSE."""
  n_l, n_u = student_labeled.shape[0], student_unlabeled.shape[0]
  return (n_l * softmax_mse_loss(student_labeled, teacher_labeled)
          + n_u * softmax_mse_loss(student_unlabeled, teacher_unlabeled)) / (n_l + n_u)


# The floor of a batch-quantile threshold. T = 0 makes the loss's exp(-d / T) 0/0 (NaN) at
# the pairs with d = 0. The smallest normal float32 keeps T > 0 on every backend (GPUs flush
# subnormals to zero, which would bring T = 0 back) and 1 / T finite (8.5e37), so the
# gradient holds no inf * 0; it lies below every positive distance the features resolve,
# so it changes T only where the quantile itself is 0 (that share of pairs equal).
MIN_THRESHOLD = float(np.finfo(np.float32).tiny)

# How the LC term sees the features (docs/reference.md "Losses" is 'raw' / 'student').
LC_FEATURES = ('raw', 'normalized')
LC_PULLS = ('student', 'teacher')
LC_PAIR_WEIGHTS = ('none', 'teacher_agreement')


def pairwise_mean_squared_distances(a: jax.Array, b: jax.Array,
                                    max_elements: int = 2**24) -> jax.Array:
  """`d[i, j] = mean_k (a[i, k] - b[j, k])^2` for all pairs, from the differences themselves.

  The Gram expansion `|a|^2 + |b|^2 - 2 a.b` cancels where `a[i]` and `b[j]`
  nearly coincide and rounds their distance to 0 or below: when the features
  collapse, most of a batch's distances were exactly 0, and so was its
  quantile threshold. Differences are exact to one rounding, so `d` is 0 only
  for equal rows, and `d_ii` of `a` against itself is exactly 0. The work and
  memory are O(N M K): one vectorised block for a training batch (128 x 128 x
  128 floats, 8 MiB), blocks of rows of `a` of at most `max_elements`
  differences for the large evaluation sets.
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  distances = lambda rows: jnp.mean(jnp.square(rows[:, None, :] - b[None, :, :]), axis=-1)
  rows_per_block = max(1, max_elements // (b.shape[0] * b.shape[1]))
  if a.shape[0] <= rows_per_block:
    return distances(a)
  return jax.lax.map(lambda row: distances(row[None])[0], a, batch_size=rows_per_block)


def unit_scaled(features: jax.Array) -> jax.Array:
  """Each row scaled to norm `sqrt(K)`: the mean-over-dims distance of two rows is then
  the squared distance of the unit vectors, in [0, 4], whatever the features' scale.

  The LC threshold of the reference is a distance in the features' own units,
  which the network can shrink to put every pair inside it (RESULTS.md); on
  this scale it cannot. A zero row stays zero, with a zero gradient.
  """
  features = features.astype(jnp.float32)
  squared_norm = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
  nonzero = squared_norm > 0
  # The inner `where` keeps rsqrt(0) = inf out of the gradient of the outer one.
  scale = jax.lax.rsqrt(jnp.where(nonzero, squared_norm, 1.0)) * np.sqrt(features.shape[-1])
  return jnp.where(nonzero, features * scale, 0.0)


class LcPairs(NamedTuple):
  """One value per pair of the LC term (a distance, a weight): the rows are the pulled
  features, the columns their targets."""

  lu: jax.Array  # (n_L, n_U): each labelled image against the unlabelled targets.
  uu: jax.Array  # (n_U, n_U): each unlabelled image against the unlabelled targets.


def lc_distances(labeled: jax.Array, unlabeled: jax.Array, teacher_unlabeled: jax.Array | None,
                 *, features: str = 'raw', pull: str = 'student') -> LcPairs:
  """The student's features against the LC targets, as `features` and `pull` choose.

  'raw' and 'student' are the reference: `P(h(L), h(U)) + P(h(U), h(U))`,
  gradients into both sides. `pull='teacher'` takes the teacher's features
  `h'(U)` as the targets, held constant: each student feature moves toward
  the teacher's features of its neighbours, and the uu diagonal pairs each
  image with the teacher's view of itself. `features='normalized'` applies
  `unit_scaled` to both sides.
  """
  if features not in LC_FEATURES or pull not in LC_PULLS:
    raise ValueError(f'features must be one of {LC_FEATURES} and pull one of {LC_PULLS}, '
                     f'got {features!r} and {pull!r}')
  targets = unlabeled if pull == 'student' else jax.lax.stop_gradient(teacher_unlabeled)
  if features == 'normalized':
    labeled, unlabeled, targets = map(unit_scaled, (labeled, unlabeled, targets))
  return LcPairs(pairwise_mean_squared_distances(labeled, targets),
                 pairwise_mean_squared_distances(unlabeled, targets))


def off_diagonal(distances: jax.Array, symmetric: bool) -> jax.Array:
  """The pairs of distinct images of a square matrix: `i < j` if `symmetric`, else every `i != j`."""
  n = distances.shape[0]
  rows, columns = np.triu_indices(n, k=1) if symmetric else np.nonzero(~np.eye(n, dtype=bool))
  return distances[rows, columns]


def batch_threshold(distances: jax.Array, quantile: float, symmetric: bool = True) -> jax.Array:
  """The `quantile` of a batch's distances between distinct images, as a constant `T >= MIN_THRESHOLD`.

  A threshold that follows the features' scale, which a fixed `T` does not:
  the feature distances of a narrower network, or of the same one later in
  training, can lie far below or above it (RESULTS.md). `distances` is the
  square matrix of the unlabelled images (`off_diagonal` says which pairs).
  """
  values = off_diagonal(jax.lax.stop_gradient(distances), symmetric)
  return jnp.maximum(jnp.quantile(values, quantile), MIN_THRESHOLD)


def within_threshold(distances: jax.Array, threshold: float | jax.Array) -> jax.Array:
  """The reference's pair mask `d <= T`, as float32 constants (no gradient)."""
  return jax.lax.stop_gradient((distances <= threshold).astype(jnp.float32))


def teacher_agreement(labels: jax.Array, teacher_logits_unlabeled: jax.Array) -> LcPairs:
  """Each LC pair's probability of sharing a class, by the teacher: weights the LC loss
  holds constant (`clustering_loss_of_distances`).

  Not in the reference. LC's pairs inside `T` share a class 3 to 5 times as
  often as chance but are still mostly of two classes (RESULTS.md, "LC
  diagnostics"); these weights pull a pair in proportion to how likely the
  teacher thinks it is one class: `p_j[y_i]` for a labelled image of label
  `y_i` against unlabelled image `j`, `p_i . p_j` for two unlabelled ones,
  with `p` the teacher's softmax. Only the labelled images' labels are used.
  """
  probs = jax.nn.softmax(teacher_logits_unlabeled.astype(jnp.float32))
  one_hot = jax.nn.one_hot(labels, probs.shape[-1], dtype=jnp.float32)
  return LcPairs(jnp.matmul(one_hot, probs.T, precision='highest'),
                 jnp.matmul(probs, probs.T, precision='highest'))


def clustering_loss_of_distances(distances: jax.Array, threshold: float | jax.Array,
                                 weights: jax.Array | None = None) -> jax.Array:
  """`sum(d * m * exp(-d / T)) / sum(m)` with `m = [d <= T]`: docs/reference.md's `P(A, B)`.

  Pulls together the pairs that are already close, weighting nearer pairs
  more; the gradient flows through both factors of `d`. Where no pair is
  within the threshold the reference divides 0 by 0 (NaN, docs/reference.md
  quirk 4); here the loss and its gradient are 0. `weights` (constants, not
  in the reference) multiply `m`: the loss is then their weighted mean.
  """
  mask = within_threshold(distances, threshold)
  if weights is not None:
    mask = mask * jax.lax.stop_gradient(weights)
  total = jnp.sum(distances * mask * jnp.exp(-distances / threshold))
  mass = jnp.sum(mask)
  return total / jnp.where(mass > 0, mass, 1.0)


def pairwise_clustering_loss(a: jax.Array, b: jax.Array, threshold: float | jax.Array) -> jax.Array:
  """`P(a, b)` over all pairs of rows of `a` and `b`, gradients into both."""
  return clustering_loss_of_distances(pairwise_mean_squared_distances(a, b), threshold)


def local_clustering_loss(labeled_features: jax.Array, unlabeled_features: jax.Array,
                          threshold: float | jax.Array) -> jax.Array:
  """`pair(f_l, f_u) + pair(f_u, f_u)`; the second term includes the diagonal `d_ii = 0`."""
  return lc_loss_of_distances(lc_distances(labeled_features, unlabeled_features, None), threshold)


def lc_loss_of_distances(distances: LcPairs, threshold: float | jax.Array,
                         weights: LcPairs | None = None) -> jax.Array:
  """The LC term `P` of the labelled-unlabelled plus that of the unlabelled-unlabelled pairs,
  each pair weighted by `weights` if given (`teacher_agreement`)."""
  weights_lu, weights_uu = (None, None) if weights is None else weights
  return (clustering_loss_of_distances(distances.lu, threshold, weights_lu)
          + clustering_loss_of_distances(distances.uu, threshold, weights_uu))


def fraction_within_threshold(a: jax.Array, b: jax.Array,
                              threshold: float | jax.Array) -> jax.Array:
  """Fraction of pairs `(a_i, b_j)` that the clustering loss acts on, a training diagnostic."""
  return jnp.mean(within_threshold(pairwise_mean_squared_distances(a, b), threshold))


def pair_purity(within: jax.Array, labels_a: jax.Array, labels_b: jax.Array, *,
                exclude_diagonal: bool = False) -> tuple[jax.Array, jax.Array]:
  """`(purity, base rate)` of a pair mask: whether LC pulls images of one class together.

  `within[i, j]` (0 or 1) marks the pairs inside `T`, or weighs them (a mask
  times `teacher_agreement`); the purity is the (weighted) fraction of them
  whose two images share a class, the base rate that
  fraction over all pairs (about 1 / classes for balanced classes): the
  purity of a mask that picks pairs at random. `exclude_diagonal` leaves the
  pairs `i == j` of a square mask out of both: an image paired with itself
  shares its class trivially. The purity is 0 where no pair is inside `T`.
  The labels serve this diagnostic only.
  """
  same = (labels_a[:, None] == labels_b[None, :]).astype(jnp.float32)
  counted = jnp.ones_like(same)
  if exclude_diagonal:
    counted = counted - jnp.eye(*same.shape, dtype=jnp.float32)
  within = jax.lax.stop_gradient(within) * counted
  mass = jnp.sum(within)
  purity = jnp.sum(within * same) / jnp.where(mass > 0, mass, 1.0)
  return purity, jnp.sum(same * counted) / jnp.sum(counted)


DISTANCE_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.95)


def strided_rows(x: jax.Array, max_rows: int) -> jax.Array:
  """At most `max_rows` rows of `x` at an even stride, so a split stored class by class
  still contributes every class."""
  return x[::max(1, -(-x.shape[0] // max_rows))]


def distance_quantiles(features: jax.Array, max_rows: int = 1000) -> jax.Array:
  """`DISTANCE_QUANTILES` of `d` over the distinct pairs of (at most `max_rows`) feature rows.

  The scale the threshold `T` is compared with: a `T` above most distances
  puts every pair inside it. Rows are taken by `strided_rows`.
  """
  features = strided_rows(features, max_rows)
  d = pairwise_mean_squared_distances(features, features)
  return jnp.quantile(off_diagonal(d, symmetric=True), jnp.asarray(DISTANCE_QUANTILES))
