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
  threshold, grad = jax.value_and_grad(losses.batch_threshold)(jnp.asarray(features), quantile)
  np.testing.assert_allclose(threshold, np.quantile(pairs, quantile), rtol=1e-5)
  np.testing.assert_array_equal(grad, 0.0)
