"""lcmt_jax.losses against NumPy re-derivations of docs/reference.md "Losses"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcmt_jax import losses

pytestmark = pytest.mark.numerics


def _np_pair_loss(a, b, threshold, include_diagonal=True):
  """docs/reference.md `pair(A, B)` as a plain double loop, in float64."""
  numerator, count = 0.0, 0
  for i in range(a.shape[0]):
    for j in range(b.shape[0]):
      if not include_diagonal and i == j:
        continue
      d = np.mean((a[i].astype(np.float64) - b[j].astype(np.float64)) ** 2)
      if d <= threshold:
        numerator += d * np.exp(-d / threshold)
        count += 1
  return numerator / count if count else 0.0


def _np_distances(a, b):
  a, b = a.astype(np.float64), b.astype(np.float64)
  return ((a[:, None, :] - b[None, :, :]) ** 2).mean(axis=2)


def _np_softmax(z):
  z = z.astype(np.float64)
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _features(seed, n_a=6, n_b=7, dim=8):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n_a, dim)).astype(np.float32),
          rng.normal(size=(n_b, dim)).astype(np.float32))


def _threshold_in_gap(distances, quantile):
  """A threshold in the widest gap between distances near `quantile`, far from every d_ij."""
  d = np.sort(distances.ravel())
  centre = int(quantile * (d.size - 1))
  lo, hi = max(centre - 8, 0), min(centre + 8, d.size - 1)
  gaps = np.diff(d[lo:hi + 1])
  k = lo + int(np.argmax(gaps))
  assert d[k + 1] - d[k] > 1e-2, 'random features gave no usable gap'
  return float((d[k] + d[k + 1]) / 2)


def _thresholds(a, b):
  d = _np_distances(a, b)
  return {'none': float(d.min()) / 2, 'some': _threshold_in_gap(d, 0.5),
          'all': float(d.max()) * 2}


@pytest.mark.parametrize('case', ['none', 'some', 'all'])
def test_pairwise_clustering_loss_matches_double_loop(case):
  a, b = _features(0)
  threshold = _thresholds(a, b)[case]
  within = (_np_distances(a, b) <= threshold).sum()
  assert {'none': within == 0, 'some': 0 < within < a.shape[0] * b.shape[0],
          'all': within == a.shape[0] * b.shape[0]}[case]

  got = jax.jit(losses.pairwise_clustering_loss)(jnp.asarray(a), jnp.asarray(b), threshold)
  np.testing.assert_allclose(float(got), _np_pair_loss(a, b, threshold), rtol=1e-5, atol=1e-7)


def test_pairwise_clustering_loss_with_no_pair_in_range_is_zero_with_zero_gradient():
  a, b = _features(1)
  threshold = _thresholds(a, b)['none']
  loss, grads = jax.jit(jax.value_and_grad(losses.pairwise_clustering_loss, argnums=(0, 1)))(
      jnp.asarray(a), jnp.asarray(b), threshold)
  assert float(loss) == 0.0
  for grad in grads:
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize('case', ['some', 'all'])
def test_pairwise_clustering_loss_gradient_matches_finite_differences(case):
  """jax.grad against central differences of the float64 NumPy loop; the mask is constant
  because the threshold sits in a wide gap between distances."""
  a, b = _features(2, n_a=4, n_b=5, dim=6)
  threshold = _thresholds(a, b)[case]
  grad_a, grad_b = jax.jit(jax.grad(losses.pairwise_clustering_loss, argnums=(0, 1)))(
      jnp.asarray(a), jnp.asarray(b), threshold)

  eps = 1e-4
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  for x, grad in ((a64, grad_a), (b64, grad_b)):
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
      old = x[index]
      x[index] = old + eps
      plus = _np_pair_loss(a64, b64, threshold)
      x[index] = old - eps
      minus = _np_pair_loss(a64, b64, threshold)
      x[index] = old
      numeric[index] = (plus - minus) / (2 * eps)
    assert np.abs(numeric).max() > 1e-3  # The check is not vacuous.
    np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-3, atol=1e-5)


def test_local_clustering_loss_is_lu_plus_uu_with_diagonal():
  labeled, unlabeled = _features(3, n_a=4, n_b=6)
  threshold = _thresholds(unlabeled, unlabeled)['some']
  expected = (_np_pair_loss(labeled, unlabeled, threshold)
              + _np_pair_loss(unlabeled, unlabeled, threshold, include_diagonal=True))
  without_diagonal = (_np_pair_loss(labeled, unlabeled, threshold)
                      + _np_pair_loss(unlabeled, unlabeled, threshold, include_diagonal=False))
  assert abs(expected - without_diagonal) > 1e-3  # The diagonal makes a visible difference.

  got = jax.jit(losses.local_clustering_loss)(jnp.asarray(labeled), jnp.asarray(unlabeled),
                                             threshold)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_fraction_within_threshold_matches_numpy():
  a, b = _features(5)
  threshold = _thresholds(a, b)['some']
  expected = np.mean(_np_distances(a, b) <= threshold)
  got = jax.jit(losses.fraction_within_threshold)(jnp.asarray(a), jnp.asarray(b), threshold)
  assert 0.0 < expected < 1.0
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_cross_entropy_matches_numpy_log_softmax():
  rng = np.random.default_rng(6)
  logits = rng.normal(scale=3.0, size=(9, 10)).astype(np.float32)
  labels = rng.integers(0, 10, size=9)
  z = logits.astype(np.float64)
  log_softmax = z - z.max(axis=1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(axis=1, keepdims=True))
  expected = -np.mean(log_softmax[np.arange(9), labels])
  got = jax.jit(losses.cross_entropy_loss)(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_softmax_mse_is_mean_over_batch_and_classes():
  rng = np.random.default_rng(7)
  student, teacher = rng.normal(size=(2, 5, 10)).astype(np.float32)
  expected = np.mean((_np_softmax(student) - _np_softmax(teacher)) ** 2)
  got = jax.jit(losses.softmax_mse_loss)(jnp.asarray(student), jnp.asarray(teacher))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_consistency_loss_weights_by_batch_size():
  rng = np.random.default_rng(8)
  zl, tl = rng.normal(size=(2, 3, 10)).astype(np.float32)
  zu, tu = rng.normal(scale=2.0, size=(2, 12, 10)).astype(np.float32)
  mse_l = np.mean((_np_softmax(zl) - _np_softmax(tl)) ** 2)
  mse_u = np.mean((_np_softmax(zu) - _np_softmax(tu)) ** 2)
  expected = (3 * mse_l + 12 * mse_u) / 15
  assert abs(expected - (mse_l + mse_u) / 2) > 1e-4  # Differs from the unweighted mean.
  got = jax.jit(losses.consistency_loss)(*map(jnp.asarray, (zl, tl, zu, tu)))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_no_gradient_reaches_teacher_logits():
  rng = np.random.default_rng(9)
  zl, tl = map(jnp.asarray, rng.normal(size=(2, 3, 10)).astype(np.float32))
  zu, tu = map(jnp.asarray, rng.normal(size=(2, 6, 10)).astype(np.float32))
  grads = jax.jit(jax.grad(losses.consistency_loss, argnums=(0, 1, 2, 3)))(zl, tl, zu, tu)
  assert np.abs(np.asarray(grads[0])).max() > 1e-4
  assert np.abs(np.asarray(grads[2])).max() > 1e-4
  np.testing.assert_array_equal(grads[1], 0.0)
  np.testing.assert_array_equal(grads[3], 0.0)
  np.testing.assert_array_equal(jax.jit(jax.grad(losses.softmax_mse_loss, argnums=1))(zl, tl), 0.0)


@pytest.mark.parametrize('rows, max_rows', [(40, 1000), (45, 10)])
def test_distance_quantiles_match_numpy_over_distinct_pairs(rows, max_rows):
  """Quantiles of `d_ij` over the pairs i < j of an evenly strided subset of rows."""
  features = np.random.default_rng(3).normal(size=(rows, 6)).astype(np.float32)
  stride = -(-rows // max_rows)
  subset = features[::stride].astype(np.float64)
  pairs = [np.mean((subset[i] - subset[j]) ** 2)
           for i in range(len(subset)) for j in range(i + 1, len(subset))]
  expected = np.quantile(pairs, losses.DISTANCE_QUANTILES)
  got = losses.distance_quantiles(jnp.asarray(features), max_rows=max_rows)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


@pytest.mark.parametrize('quantile', [0.1, 0.5, 0.93])
def test_batch_threshold_is_the_quantile_of_distinct_pairs_without_gradient(quantile):
  features = np.random.default_rng(5).normal(size=(20, 7)).astype(np.float32)
  pairs = [np.mean((features[i].astype(np.float64) - features[j]) ** 2)
           for i in range(20) for j in range(i + 1, 20)]

  def threshold_of(features):
    return losses.batch_threshold(losses.pairwise_mean_squared_distances(features, features),
                                  quantile)

  threshold, grad = jax.value_and_grad(threshold_of)(jnp.asarray(features))
  np.testing.assert_allclose(threshold, np.quantile(pairs, quantile), rtol=1e-5)
  np.testing.assert_array_equal(grad, 0.0)


def test_batch_threshold_of_a_non_symmetric_matrix_takes_every_off_diagonal_pair():
  distances = np.random.default_rng(6).uniform(size=(9, 9)).astype(np.float32)
  off_diagonal = [distances[i, j] for i in range(9) for j in range(9) if i != j]
  upper = [distances[i, j] for i in range(9) for j in range(i + 1, 9)]
  got = losses.batch_threshold(jnp.asarray(distances), 0.3, symmetric=False)
  np.testing.assert_allclose(got, np.quantile(off_diagonal, 0.3), rtol=1e-6)
  assert abs(np.quantile(off_diagonal, 0.3) - np.quantile(upper, 0.3)) > 1e-3  # Not the same.


@pytest.mark.parametrize('max_elements', [2**24, 100])
def test_pairwise_distances_match_the_double_loop_in_one_block_and_in_many(max_elements):
  a, b = _features(10, n_a=13, n_b=7, dim=5)
  got = losses.pairwise_mean_squared_distances(jnp.asarray(a), jnp.asarray(b), max_elements)
  expected = [[np.mean((a[i].astype(np.float64) - b[j]) ** 2) for j in range(7)]
              for i in range(13)]
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def _nearly_coincident(n=64, dim=16, scale=1e-4, seed=11):
  """Features at one point of norm ~12, spread by `scale`: the Gram expansion rounds their
  distances (~scale^2) to 0, as it did for the collapsed features of issue 28."""
  rng = np.random.default_rng(seed)
  centre = rng.normal(size=dim) * 3.0
  return (centre + scale * rng.normal(size=(n, dim))).astype(np.float32)


def test_distances_of_nearly_coincident_features_are_exact_not_zero():
  features = _nearly_coincident()
  f64 = features.astype(np.float64)
  expected = ((f64[:, None] - f64[None]) ** 2).mean(-1)
  a = jnp.asarray(features)
  gram = (jnp.sum(a**2, 1)[:, None] + jnp.sum(a**2, 1)[None] - 2 * jnp.matmul(
      a, a.T, precision='highest')) / a.shape[1]
  off = ~np.eye(len(features), dtype=bool)
  # The expansion this replaces: its error is as large as the distances themselves.
  assert np.max(np.abs(np.asarray(gram)[off] - expected[off])) > 0.5 * np.median(expected[off])
  got = np.asarray(losses.pairwise_mean_squared_distances(a, a))
  # Each difference is exact to float32's rounding of the features (ulp 1e-6 near 10 against a
  # spread of 1e-4): 1e-2 relative, measured 5e-3.
  np.testing.assert_allclose(got[off], expected[off], rtol=2e-2)
  np.testing.assert_array_equal(np.diag(got), 0.0)


@pytest.mark.parametrize('spread', [1e-4, 0.0])
def test_quantile_threshold_stays_positive_and_loss_finite_for_coincident_features(spread):
  """Nearly coincident features get their real 10 % quantile; identical ones (quantile 0) the
  floor `MIN_THRESHOLD`; the loss and its gradient are finite either way."""
  features = _nearly_coincident(scale=spread)
  labeled = jnp.asarray(features[:8])

  def loss(labeled, unlabeled):
    distances = losses.lc_distances(labeled, unlabeled, None)
    threshold = losses.batch_threshold(distances.uu, 0.1)
    return losses.lc_loss_of_distances(distances, threshold), threshold

  (value, threshold), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      labeled, jnp.asarray(features))
  assert float(threshold) > 0.0
  if spread:
    f64 = features.astype(np.float64)
    pairs = [np.mean((f64[i] - f64[j]) ** 2) for i in range(64) for j in range(i + 1, 64)]
    np.testing.assert_allclose(threshold, np.quantile(pairs, 0.1), rtol=2e-2)
    assert float(value) > 0.0
  else:
    assert float(threshold) == losses.MIN_THRESHOLD and float(value) == 0.0
  assert np.isfinite(float(value))
  for grad in grads:
    assert np.all(np.isfinite(grad))


def _np_unit_scaled(x):
  x = x.astype(np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True) * np.sqrt(x.shape[1])


@pytest.mark.parametrize('features, pull', [('raw', 'student'), ('normalized', 'student'),
                                            ('raw', 'teacher'), ('normalized', 'teacher')])
def test_lc_variants_match_the_double_loop_and_leave_the_teacher_without_gradient(features, pull):
  rng = np.random.default_rng(12)
  labeled, unlabeled, teacher = (rng.normal(scale=3.0, size=(n, 6)).astype(np.float32)
                                 for n in (4, 9, 9))
  np_l, np_u, np_t = labeled, unlabeled, teacher if pull == 'teacher' else unlabeled
  if features == 'normalized':
    np_l, np_u, np_t = map(_np_unit_scaled, (np_l, np_u, np_t))
    # Unit vectors: mean-over-dims distances of the scaled rows are |u - v|^2, in [0, 4].
    u = np_u / np.linalg.norm(np_u, axis=1, keepdims=True)
    v = np_t / np.linalg.norm(np_t, axis=1, keepdims=True)
    np.testing.assert_allclose(_np_distances(np_u, np_t), ((u[:, None] - v[None]) ** 2).sum(-1),
                               rtol=1e-12)
  threshold = _threshold_in_gap(_np_distances(np_u, np_t), 0.4)
  expected = _np_pair_loss(np_l, np_t, threshold) + _np_pair_loss(np_u, np_t, threshold)

  def loss(labeled, unlabeled, teacher):
    distances = losses.lc_distances(labeled, unlabeled, teacher, features=features, pull=pull)
    return losses.lc_loss_of_distances(distances, threshold), distances

  (value, distances), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      *map(jnp.asarray, (labeled, unlabeled, teacher)))
  np.testing.assert_allclose(distances.lu, _np_distances(np_l, np_t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(distances.uu, _np_distances(np_u, np_t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  assert np.abs(grads[0]).max() > 1e-4 and np.abs(grads[1]).max() > 1e-4
  np.testing.assert_array_equal(grads[2], 0.0)  # The teacher: a target, or not used at all.


def test_unit_scaled_zero_row_stays_zero_with_zero_gradient():
  x = jnp.asarray([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
  np.testing.assert_allclose(losses.unit_scaled(x), [[0, 0, 0], [0.6 * 3**.5, 0.8 * 3**.5, 0]],
                             rtol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(losses.unit_scaled(x)[0] * jnp.arange(3.0)))(x)
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize('exclude_diagonal', [False, True])
def test_pair_purity_matches_counting_pairs(exclude_diagonal):
  rng = np.random.default_rng(13)
  labels = rng.integers(0, 3, size=10)
  within = (rng.uniform(size=(10, 10)) < 0.3).astype(np.float32)
  inside = same = total = same_total = 0
  for i in range(10):
    for j in range(10):
      if exclude_diagonal and i == j:
        continue
      total += 1
      same_total += labels[i] == labels[j]
      if within[i, j]:
        inside += 1
        same += labels[i] == labels[j]
  purity, base_rate = losses.pair_purity(jnp.asarray(within), jnp.asarray(labels),
                                         jnp.asarray(labels), exclude_diagonal=exclude_diagonal)
  np.testing.assert_allclose(purity, same / inside, rtol=1e-6)
  np.testing.assert_allclose(base_rate, same_total / total, rtol=1e-6)
  empty, _ = losses.pair_purity(jnp.zeros((10, 10)), jnp.asarray(labels), jnp.asarray(labels))
  assert float(empty) == 0.0


def test_teacher_agreement_weighted_loss_matches_the_double_loop():
  """`lc_pair_weight='teacher_agreement'`: each pair inside T weighs `p_j[y_i]` (labelled i) or
  `p_i . p_j` (unlabelled i), p the teacher's softmax; the loss is their weighted mean, and no
  gradient reaches the teacher's logits."""
  rng = np.random.default_rng(14)
  labeled, unlabeled = (rng.normal(scale=3.0, size=(n, 6)).astype(np.float32) for n in (4, 9))
  labels = rng.integers(0, 5, size=4)
  teacher_logits = rng.normal(scale=2.0, size=(9, 5)).astype(np.float32)
  p = _np_softmax(teacher_logits)
  threshold = _threshold_in_gap(_np_distances(unlabeled, unlabeled), 0.4)

  def weighted_pair_loss(a, weight_of):
    numerator = mass = 0.0
    for i in range(a.shape[0]):
      for j in range(unlabeled.shape[0]):
        d = np.mean((a[i].astype(np.float64) - unlabeled[j]) ** 2)
        if d <= threshold:
          numerator += weight_of(i, j) * d * np.exp(-d / threshold)
          mass += weight_of(i, j)
    return numerator / mass

  expected = (weighted_pair_loss(labeled, lambda i, j: p[j, labels[i]])
              + weighted_pair_loss(unlabeled, lambda i, j: p[i] @ p[j]))

  def loss(labeled, unlabeled, teacher_logits):
    weights = losses.teacher_agreement(jnp.asarray(labels), teacher_logits)
    return losses.lc_loss_of_distances(losses.lc_distances(labeled, unlabeled, None), threshold,
                                       weights), weights

  (value, weights), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      *map(jnp.asarray, (labeled, unlabeled, teacher_logits)))
  np.testing.assert_allclose(weights.lu, p[:, labels].T, rtol=1e-5)
  np.testing.assert_allclose(weights.uu, p @ p.T, rtol=1e-5)
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  unweighted = losses.lc_loss_of_distances(
      losses.lc_distances(*map(jnp.asarray, (labeled, unlabeled)), None), threshold)
  assert abs(float(unweighted) - expected) > 1e-3 * expected  # The weights matter here.
  assert np.abs(grads[0]).max() > 1e-4 and np.abs(grads[1]).max() > 1e-4
  np.testing.assert_array_equal(grads[2], 0.0)


def test_pair_purity_of_weighted_pairs_is_the_weighted_fraction_of_one_class():
  rng = np.random.default_rng(15)
  labels = rng.integers(0, 3, size=8)
  weights = rng.uniform(size=(8, 8)) * (rng.uniform(size=(8, 8)) < 0.5)
  same = mass = 0.0
  for i in range(8):
    for j in range(8):
      if i != j:
        mass += weights[i, j]
        same += weights[i, j] * (labels[i] == labels[j])
  purity, _ = losses.pair_purity(jnp.asarray(weights, jnp.float32), jnp.asarray(labels),
                                 jnp.asarray(labels), exclude_diagonal=True)
  np.testing.assert_allclose(purity, same / mass, rtol=1e-5)
