"""Loss terms of Mean Teacher with Local Clustering (docs/reference.md "Losses").

All are pure functions of arrays and run under `jit`; they compute in float32
whatever the network's compute dtype.
"""

import jax
import jax.numpy as jnp
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


def pairwise_mean_squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """`d[i, j] = mean_k (a[i, k] - b[j, k])^2` for all pairs, as one Gram-matrix kernel.

  The expansion `|a|^2 + |b|^2 - 2 a.b` needs O(N M) memory instead of the
  O(N M K) of broadcasting; the matmul runs at full float32 precision (no TF32)
  because the distances are compared against a threshold.
  """
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  gram = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  squared = jnp.sum(a**2, axis=1)[:, None] + jnp.sum(b**2, axis=1)[None, :] - 2.0 * gram
  # Rounding can leave tiny negatives where a[i] == b[j].
  return jnp.maximum(squared, 0.0) / a.shape[1]


def batch_threshold(features: jax.Array, quantile: float) -> jax.Array:
  """The `quantile` of `d` over the distinct pairs of rows of `features`, as a constant.

  A threshold that follows the features' scale, which a fixed `T` does not:
  the feature distances of a narrower network, or of the same one later in
  training, can lie far below or above it (RESULTS.md).
  """
  features = jax.lax.stop_gradient(features)
  d = pairwise_mean_squared_distances(features, features)
  return jnp.quantile(d[jnp.triu_indices(features.shape[0], k=1)], quantile)


def within_threshold(distances: jax.Array, threshold: float | jax.Array) -> jax.Array:
  """The reference's pair mask `d <= T`, as float32 constants (no gradient)."""
  return jax.lax.stop_gradient((distances <= threshold).astype(jnp.float32))


def pairwise_clustering_loss(a: jax.Array, b: jax.Array, threshold: float | jax.Array) -> jax.Array:
  """`sum(d * m * exp(-d / T)) / sum(m)` over all pairs of rows of `a` and `b`.

  Pulls together the pairs that are already close (`d <= T`), weighting
  nearer pairs more. Gradients flow through both factors into `a` and `b`.
  Where no pair is within the threshold the reference divides 0 by 0 (NaN,
  docs/reference.md quirk 4); here the loss and its gradient are 0.
  """
  d = pairwise_mean_squared_distances(a, b)
  mask = within_threshold(d, threshold)
  total = jnp.sum(d * mask * jnp.exp(-d / threshold))
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def local_clustering_loss(labeled_features: jax.Array, unlabeled_features: jax.Array,
                          threshold: float | jax.Array) -> jax.Array:
  """`pair(f_l, f_u) + pair(f_u, f_u)`; the second term includes the diagonal `d_ii = 0`."""
  return (pairwise_clustering_loss(labeled_features, unlabeled_features, threshold)
          + pairwise_clustering_loss(unlabeled_features, unlabeled_features, threshold))


def fraction_within_threshold(a: jax.Array, b: jax.Array,
                              threshold: float | jax.Array) -> jax.Array:
  """Fraction of pairs `(a_i, b_j)` that the clustering loss acts on, a training diagnostic."""
  return jnp.mean(within_threshold(pairwise_mean_squared_distances(a, b), threshold))


DISTANCE_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.95)


def distance_quantiles(features: jax.Array, max_rows: int = 1000) -> jax.Array:
  """`DISTANCE_QUANTILES` of `d` over the distinct pairs of (at most `max_rows`) feature rows.

  The scale the threshold `T` is compared with: a `T` above most distances
  puts every pair inside it. Rows are taken at an even stride, so a split
  stored class by class still contributes every class.
  """
  features = features[::max(1, -(-features.shape[0] // max_rows))]
  d = pairwise_mean_squared_distances(features, features)
  upper = jnp.triu_indices(features.shape[0], k=1)
  return jnp.quantile(d[upper], jnp.asarray(DISTANCE_QUANTILES))
