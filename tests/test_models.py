"""lcmt_jax.models against NumPy re-derivations of docs/reference.md "Model"."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lcmt_jax import models
from lcmt_jax import ops
from lcmt_jax.xla_cpu import flags as cpu_flags
from lcmt_jax.xla_cpu import kernels
from tests import conftest
from lcmt_jax.testing.runs import REPO

pytestmark = pytest.mark.numerics

LAYERS = ('conv1a', 'conv1b', 'conv1c', 'conv2a', 'conv2b', 'conv2c', 'conv3a', 'conv3b',
          'conv3c', 'dense')
WIDTH = 8


def _random_variables(module, x, seed, **apply_kwargs):
  """Variables of `module` filled by NumPy: shapes from `jax.eval_shape`, so nothing compiles.

  `g`, `b` and the running means are random and non-trivial, unlike their initial values.
  """
  shapes = jax.eval_shape(
      functools.partial(module.init, train=False, **apply_kwargs), jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'v':
      return rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
    if name == 'g':
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0.0, 0.5, leaf.shape).astype(np.float32)  # b, running mean

  return jax.tree.map_with_path(fill, shapes)


def _np_weight(v, g):
  """docs/reference.md `W = g * v / sqrt(sum(v^2) + 1e-8)`, norm per output unit (last axis)."""
  v = np.asarray(v, np.float64)
  norm = np.sqrt((v ** 2).reshape(-1, v.shape[-1]).sum(axis=0) + 1e-8)
  return v * (np.asarray(g, np.float64) / norm)


def _np_same_pads(size, k, stride):
  """TensorFlow's (and `lax`'s) 'SAME': `ceil(size / stride)` outputs, the odd pixel of
  padding at the end."""
  total = max((-(-size // stride) - 1) * stride + k - size, 0)
  return total // 2, total - total // 2


def _np_padded(x, kernel_shape, padding, stride):
  (kh, kw), (_, h, w, _) = kernel_shape, x.shape
  if padding != 'SAME':
    return x
  return np.pad(x, ((0, 0), _np_same_pads(h, kh, stride), _np_same_pads(w, kw, stride), (0, 0)))


def _np_project(x, w, padding, stride=1):
  """`xW` for a dense kernel (I, O) or a conv kernel (H, W, I, O) on NHWC input, in float64."""
  x = np.asarray(x, np.float64)
  if w.ndim == 2:
    return x @ w
  kh, kw = w.shape[:2]
  x = _np_padded(x, (kh, kw), padding, stride)
  out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      out += x[:, i:i + stride * out_h:stride, j:j + stride * out_w:stride, :] @ w[i, j]
  return out


def _np_layer_preactivation(variables, x, padding):
  params = variables['params']
  return _np_project(x, _np_weight(params['v'], params['g']), padding)


def _np_leaky_relu(x):
  return np.where(x >= 0, x, 0.1 * x)


# (kernel_size, padding, input shape): the dense layer and the three conv kinds of ConvLarge.
LAYER_CASES = [
    ((), 'SAME', (6, 5)),
    ((3, 3), 'SAME', (3, 5, 5, 4)),
    ((3, 3), 'VALID', (3, 5, 5, 4)),
    ((1, 1), 'SAME', (3, 4, 4, 4)),
]
LAYER_IDS = ['dense', 'conv3x3_same', 'conv3x3_valid', 'conv1x1']


def _layer_and_input(kernel_size, padding, shape, seed=0, **kwargs):
  layer = models.WeightNormMeanOnlyBN(features=6, kernel_size=kernel_size, padding=padding,
                                      **kwargs)
  x = np.random.default_rng(100 + seed).normal(size=shape).astype(np.float32)
  return layer, x, _random_variables(layer, x, seed)


def _apply(layer, variables, x, **kwargs):
  return jax.jit(functools.partial(layer.apply, **kwargs))(variables, x)


@pytest.mark.parametrize('kernel_size, padding, shape', LAYER_CASES, ids=LAYER_IDS)
def test_layer_train_mode_matches_numpy(kernel_size, padding, shape):
  layer, x, variables = _layer_and_input(kernel_size, padding, shape)
  y, _ = _apply(layer, variables, x, train=True, mutable=['batch_stats'])

  a = _np_layer_preactivation(variables, x, padding)
  axes = tuple(range(a.ndim - 1))
  expected = a - a.mean(axis=axes) + variables['params']['b']
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
  # Output minus bias has zero mean per channel over batch and space.
  np.testing.assert_allclose(np.mean(np.asarray(y, np.float64) - variables['params']['b'],
                                     axis=axes), 0.0, atol=1e-5)


@pytest.mark.parametrize('kernel_size, padding, shape', LAYER_CASES, ids=LAYER_IDS)
def test_layer_eval_mode_subtracts_running_mean(kernel_size, padding, shape):
  layer, x, variables = _layer_and_input(kernel_size, padding, shape, seed=1)
  y = _apply(layer, variables, x, train=False)

  a = _np_layer_preactivation(variables, x, padding)
  expected = a - variables['batch_stats']['mean'] + variables['params']['b']
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kernel_size, padding, shape', LAYER_CASES, ids=LAYER_IDS)
def test_layer_running_mean_moves_with_momentum_0_001(kernel_size, padding, shape):
  layer, x, variables = _layer_and_input(kernel_size, padding, shape, seed=2)
  _, state = _apply(layer, variables, x, train=True, mutable=['batch_stats'])

  a = _np_layer_preactivation(variables, x, padding)
  old = np.asarray(variables['batch_stats']['mean'], np.float64)
  expected = 0.999 * old + 0.001 * a.mean(axis=tuple(range(a.ndim - 1)))
  np.testing.assert_allclose(state['batch_stats']['mean'], expected, rtol=1e-5, atol=1e-7)
  assert not np.allclose(state['batch_stats']['mean'], old, rtol=0, atol=1e-5)


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('kernel_size, padding, shape', LAYER_CASES, ids=LAYER_IDS)
def test_layer_output_is_invariant_to_scale_of_v(kernel_size, padding, shape, train):
  layer, x, variables = _layer_and_input(kernel_size, padding, shape, seed=3)
  scaled = jax.tree.map(lambda t: t, variables)
  scaled['params']['v'] = variables['params']['v'] * 3.7
  kwargs = {'train': train, 'mutable': ['batch_stats']} if train else {'train': False}
  y = _apply(layer, variables, x, **kwargs)
  y_scaled = _apply(layer, scaled, x, **kwargs)
  if train:
    y, y_scaled = y[0], y_scaled[0]
  np.testing.assert_allclose(y_scaled, y, rtol=1e-5, atol=1e-5)
  # The scale g, by contrast, does change the output.
  rescaled_g = jax.tree.map(lambda t: t, variables)
  rescaled_g['params']['g'] = variables['params']['g'] * 3.7
  y_g = _apply(layer, rescaled_g, x, **kwargs)
  assert not np.allclose(y_g[0] if train else y_g, y, atol=1e-3)


@pytest.mark.parametrize('init_scale', [1.0, 0.1])
@pytest.mark.parametrize('kernel_size, padding, shape', LAYER_CASES[:2], ids=LAYER_IDS[:2])
def test_layer_init_mode_sets_g_b_from_batch_statistics(kernel_size, padding, shape, init_scale):
  layer, x, variables = _layer_and_input(kernel_size, padding, shape, seed=4,
                                         init_scale=init_scale)
  y, updated = _apply(layer, variables, x, train=True, init_mode=True, mutable=['params'])

  a = _np_layer_preactivation(variables, x, padding)
  axes = tuple(range(a.ndim - 1))
  m = a.mean(axis=axes)
  s = np.sqrt(((a - m) ** 2).mean(axis=axes) + 1e-8)
  params = variables['params']
  np.testing.assert_allclose(updated['params']['g'], params['g'] * init_scale / s, rtol=1e-4)
  np.testing.assert_allclose(updated['params']['b'], -m * init_scale / s, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(updated['params']['v'], params['v'])
  np.testing.assert_allclose(y, (a - m) * init_scale / s, rtol=1e-4, atol=1e-5)
  assert 'batch_stats' not in updated


# --- ConvLarge ---------------------------------------------------------------------------------


def _is_wn_layer(module, method_name):
  return isinstance(module, models.WeightNormMeanOnlyBN) and method_name == '__call__'


def _layer_outputs(intermediates):
  return {name: np.asarray(intermediates[name]['__call__'][0]) for name in LAYERS}


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(7).normal(size=(12, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def model():
  return models.ConvLarge(width=WIDTH, dropout_rate=0.0)


@pytest.fixture(scope='module')
def variables(model, images):
  variables = _random_variables(model, images[:1], seed=11)
  # Start from docs/reference.md's initial values: g = 1, b = 0, running means 0.
  params = jax.tree.map_with_path(
      lambda p, t: {'v': t, 'g': np.ones_like(t), 'b': np.zeros_like(t)}[p[-1].key],
      variables['params'])
  return {'params': params,
          'batch_stats': jax.tree.map(np.zeros_like, variables['batch_stats'])}


@pytest.fixture(scope='module')
def ddi_variables(model, variables, images):
  ddi = jax.jit(functools.partial(models.data_dependent_init, model))
  return ddi(variables, images, jax.random.key(0))


def test_data_dependent_init_normalises_every_layer(model, ddi_variables, images):
  _, state = jax.jit(functools.partial(
      model.apply, train=False, mutable=['intermediates'],
      capture_intermediates=_is_wn_layer))(ddi_variables, images)
  outputs = _layer_outputs(state['intermediates'])
  assert len(outputs) == 10
  for name, out in outputs.items():
    init_scale = 0.1 if name == 'dense' else 1.0
    axes = tuple(range(out.ndim - 1))
    np.testing.assert_allclose(out.mean(axis=axes), 0.0, atol=2e-5 * init_scale + 1e-6,
                               err_msg=name)
    np.testing.assert_allclose(out.std(axis=axes), init_scale, rtol=1e-3, err_msg=name)


def test_eval_pass_after_ddi_reproduces_the_init_pass(model, variables, ddi_variables, images):
  capture = functools.partial(model.apply, capture_intermediates=_is_wn_layer)
  _, init_state = jax.jit(functools.partial(
      capture, train=True, init_mode=True, mutable=['params', 'intermediates']))(
          variables, images)
  _, eval_state = jax.jit(functools.partial(capture, train=False, mutable=['intermediates']))(
      ddi_variables, images)
  init_outputs = _layer_outputs(init_state['intermediates'])
  for name, out in _layer_outputs(eval_state['intermediates']).items():
    scale = 0.1 if name == 'dense' else 1.0
    np.testing.assert_allclose(out, init_outputs[name], rtol=1e-3, atol=1e-4 * scale,
                               err_msg=name)


def test_data_dependent_init_changes_only_g_and_b(variables, ddi_variables):
  for name in LAYERS:
    before, after = variables['params'][name], ddi_variables['params'][name]
    np.testing.assert_array_equal(after['v'], before['v'])
    assert not np.allclose(after['g'], before['g'])
    assert not np.allclose(after['b'], before['b'])
    np.testing.assert_array_equal(ddi_variables['batch_stats'][name]['mean'], 0.0)


def test_parameter_count_at_width_128():
  w = 128
  # (kernel side, in, out) of the nine convs, then the dense layer: docs/reference.md "Model".
  convs = [(3, 3, w), (3, w, w), (3, w, w), (3, w, 2 * w), (3, 2 * w, 2 * w),
           (3, 2 * w, 2 * w), (3, 2 * w, 4 * w), (1, 4 * w, 2 * w), (1, 2 * w, w)]
  expected_shapes = {name: {'v': (k, k, c_in, c_out), 'g': (c_out,), 'b': (c_out,)}
                     for name, (k, c_in, c_out) in zip(LAYERS, convs)}
  expected_shapes['dense'] = {'v': (w, 10), 'g': (10,), 'b': (10,)}
  expected = sum(k * k * c_in * c_out + 2 * c_out for k, c_in, c_out in convs) + w * 10 + 2 * 10

  shapes = jax.eval_shape(functools.partial(models.init_variables, models.ConvLarge()),
                          jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
  got_shapes = jax.tree.map(lambda t: t.shape, shapes['params'])
  assert got_shapes == expected_shapes
  count = sum(np.prod(t.shape) for t in jax.tree.leaves(shapes['params']))
  assert count == expected
  assert round(count / 1e6, 1) == 3.1
  assert set(shapes['batch_stats']) == set(LAYERS)


def test_features_are_the_pooled_input_of_the_dense_layer(model, ddi_variables, images):
  variables = jax.tree.map(lambda t: t, ddi_variables)
  variables['batch_stats']['dense']['mean'] = np.linspace(-0.3, 0.4, 10).astype(np.float32)
  logits, features, batch_stats = jax.jit(functools.partial(
      models.apply_with_features, model.apply, train=False))(variables, images)
  assert features.shape == (images.shape[0], WIDTH)
  # Eval mode hands back the running means unchanged.
  assert jax.tree.all(
      jax.tree.map(np.array_equal, batch_stats, variables['batch_stats']))

  _, state = jax.jit(functools.partial(
      model.apply, train=False, mutable=['intermediates'],
      capture_intermediates=_is_wn_layer))(variables, images)
  conv3c = np.asarray(state['intermediates']['conv3c']['__call__'][0], np.float64)
  np.testing.assert_allclose(features, _np_leaky_relu(conv3c).mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)

  dense = variables['params']['dense']
  expected_logits = (np.asarray(features, np.float64) @ _np_weight(dense['v'], dense['g'])
                     - variables['batch_stats']['dense']['mean'] + dense['b'])
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-5)


def test_apply_with_features_train_mode_returns_updated_batch_stats(model, ddi_variables, images):
  logits, features, batch_stats = jax.jit(functools.partial(
      models.apply_with_features, model.apply, train=True))(ddi_variables, images)
  expected_logits, state = jax.jit(functools.partial(
      model.apply, train=True, mutable=['batch_stats']))(ddi_variables, images)
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-6)
  for name in LAYERS:
    np.testing.assert_allclose(batch_stats[name]['mean'], state['batch_stats'][name]['mean'],
                               rtol=1e-6)
    assert np.any(np.asarray(batch_stats[name]['mean']) != 0.0)
  assert features.shape == (images.shape[0], WIDTH)


def test_bfloat16_model_keeps_float32_params_and_close_logits(ddi_variables, images):
  bf16_model = models.ConvLarge(width=WIDTH, dropout_rate=0.0, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(functools.partial(models.init_variables, bf16_model),
                          jax.random.key(0), images[:2])
  assert {t.dtype for t in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}

  fp32_model = models.ConvLarge(width=WIDTH, dropout_rate=0.0)
  fp32 = jax.jit(functools.partial(fp32_model.apply, train=False))(ddi_variables, images)
  bf16 = jax.jit(functools.partial(bf16_model.apply, train=False))(ddi_variables, images)
  assert bf16.dtype == jnp.float32
  assert np.all(np.isfinite(bf16))
  fp32, bf16 = np.asarray(fp32), np.asarray(bf16)
  # bfloat16 keeps ~3 significant digits and the error grows over ten layers; measured max
  # error is ~15% of the logits' spread at this width, so allow twice that.
  spread = fp32.std()
  assert np.abs(bf16 - fp32).max() < 0.3 * spread
  assert np.mean(np.argmax(bf16, axis=1) == np.argmax(fp32, axis=1)) >= 0.75
  assert not np.array_equal(bf16, fp32)  # It really computed in bfloat16.


def _np_conv_gradients(x, w, padding, out_grad, stride=1):
  """Input and kernel gradients of `sum(_np_project(x, w, padding, stride) * out_grad)`, in
  float64."""
  x, w, out_grad = (np.asarray(a, np.float64) for a in (x, w, out_grad))
  kh, kw = w.shape[:2]
  padded = _np_padded(x, (kh, kw), padding, stride)
  out_h, out_w = out_grad.shape[1:3]
  dx, dw = np.zeros_like(padded), np.zeros_like(w)
  for i in range(kh):
    for j in range(kw):
      rows, cols = slice(i, i + stride * out_h, stride), slice(j, j + stride * out_w, stride)
      dw[i, j] = np.einsum('nhwi,nhwo->io', padded[:, rows, cols, :], out_grad)
      dx[:, rows, cols, :] += out_grad @ w[i, j].T
  if padding == 'SAME':
    top, left = _np_same_pads(x.shape[1], kh, stride)[0], _np_same_pads(x.shape[2], kw, stride)[0]
    dx = dx[:, top:top + x.shape[1], left:left + x.shape[2]]
  return dx, dw


# (kernel size, padding, stride, input shape): ConvLarge's convs and WRN's strided ones; lax pads
# a 3x3 stride-2 SAME conv (0, 1) on an even input, (1, 1) on an odd one, and a 1x1 at stride 2
# never reads the last row or column of an even input.
CONV_CASES = [((3, 3), 'SAME', 1, (3, 6, 5, 4)), ((3, 3), 'VALID', 1, (3, 6, 5, 4)),
              ((1, 1), 'SAME', 1, (2, 4, 4, 3)), ((3, 3), 'SAME', 2, (2, 6, 8, 3)),
              ((3, 3), 'SAME', 2, (2, 7, 5, 3)), ((1, 1), 'SAME', 2, (2, 6, 7, 3))]
CONV_IDS = ['3x3_same', '3x3_valid', '1x1', '3x3_same_stride2', '3x3_same_stride2_odd',
            '1x1_stride2']


@pytest.mark.parametrize('kernel_size, padding, stride, shape', CONV_CASES, ids=CONV_IDS)
def test_conv2d_values_and_gradients_match_numpy(kernel_size, padding, stride, shape):
  rng = np.random.default_rng(7)
  x = rng.normal(size=shape).astype(np.float32)
  w = rng.normal(size=(*kernel_size, shape[-1], 5)).astype(np.float32)
  out, vjp = jax.vjp(lambda a, b: kernels.conv2d(a, b, padding, stride), x, w)
  out_grad = rng.normal(size=out.shape).astype(np.float32)
  dx, dw = vjp(out_grad)
  np_dx, np_dw = _np_conv_gradients(x, w, padding, out_grad, stride)
  np.testing.assert_allclose(out, _np_project(x, w, padding, stride), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, np_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, np_dw, rtol=1e-5, atol=1e-5)


_BF16_CONV_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from lcmt_jax.xla_cpu import kernels
x, w, g = (jnp.asarray(a, jnp.bfloat16) for a in np.load(sys.argv[1]).values())
fn = jax.jit(lambda x, w, g: (lambda out, vjp: (out, *vjp(g)))(*jax.vjp(
    lambda a, b: kernels.conv2d(a, b, 'SAME'), x, w)))
np.savez(sys.argv[2], *(np.asarray(r, np.float32) for r in fn(x, w, g)))
"""


@pytest.mark.skipif(not cpu_flags.jaxlib_has_flag(cpu_flags.BF16_FLAG),
                    reason='the installed jaxlib has no oneDNN custom-call flag')
def test_bfloat16_conv2d_on_onednn_matches_numpy(tmp_path):
  """The flag a bfloat16 run sets (`xla_cpu.configure`) hands the
  convolutions to oneDNN where jaxlib can (0.11); values and gradients stay those of
  the convolution, to bfloat16's precision."""
  rng = np.random.default_rng(8)
  bf16 = lambda shape: np.asarray(jnp.asarray(rng.normal(size=shape), jnp.bfloat16), np.float32)
  x, w, g = bf16((4, 8, 8, 16)), bf16((3, 3, 16, 24)), bf16((4, 8, 8, 24))
  np.savez(tmp_path / 'in.npz', x=x, w=w, g=g)
  env = dict(os.environ, XLA_FLAGS=conftest.subprocess_xla_flags(
      f'--{cpu_flags.FLAG}={cpu_flags.VALUE}', f'--{cpu_flags.BF16_FLAG}={cpu_flags.BF16_VALUE}'),
      PYTHONPATH=REPO)
  subprocess.run([sys.executable, '-c', _BF16_CONV_SCRIPT, str(tmp_path / 'in.npz'),
                  str(tmp_path / 'out.npz')], env=env, check=True)
  out = np.load(tmp_path / 'out.npz')
  np_dx, np_dw = _np_conv_gradients(x, w, 'SAME', g)
  for got, want in ((out['arr_0'], _np_project(x, w, 'SAME')), (out['arr_1'], np_dx),
                    (out['arr_2'], np_dw)):
    # Sums of products of bfloat16 numbers, rounded to bfloat16 (8 significant bits).
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=2**-7 * np.abs(want).max())


def _np_max_pool_2x2_gradient(x, out_grad):
  """Each window's gradient to its first maximum in row-major order (PyTorch's choice)."""
  dx = np.zeros_like(x)
  for n, i, j, c in np.ndindex(*out_grad.shape):
    window = x[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c]
    top, left = np.unravel_index(np.argmax(window), (2, 2))  # argmax: first maximum.
    dx[n, 2 * i + top, 2 * j + left, c] = out_grad[n, i, j, c]
  return dx


@pytest.mark.parametrize('shape', [(2, 4, 6, 3), (1, 5, 7, 2)], ids=['even', 'odd'])
def test_max_pool_2x2_matches_flax_and_routes_ties_to_the_first_maximum(shape):
  # Small integers make many windows hold tied maxima.
  x = np.random.default_rng(3).integers(0, 3, shape).astype(np.float32)
  out, vjp = jax.vjp(kernels.max_pool_2x2, x)
  out_grad = np.random.default_rng(4).normal(size=out.shape).astype(np.float32)
  np.testing.assert_array_equal(out, nn.max_pool(jnp.asarray(x), (2, 2), strides=(2, 2)))
  np.testing.assert_array_equal(vjp(out_grad)[0], _np_max_pool_2x2_gradient(x, out_grad))


BACKENDS = ('cpu', 'gpu')  # `ops` picks its implementation by JAX's default backend.


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('dtype, tolerance', [(jnp.float32, 1e-5), (jnp.bfloat16, 2**-7)],
                         ids=['float32', 'bfloat16'])
def test_subtract_batch_mean_values_and_gradients_match_numpy(monkeypatch, backend, dtype,
                                                              tolerance):
  """One arithmetic on every backend (the accelerator's forced here on the CPU): the mean and
  both sums of the gradient accumulate in float32, also in bfloat16."""
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  rng = np.random.default_rng(9)
  as_dtype = lambda a: np.asarray(jnp.asarray(a, dtype), np.float64)  # Exactly representable.
  shape = (8, 6, 6, 6)  # 288 values a channel: a bfloat16 sum of them loses most of its bits.
  a, g = as_dtype(rng.normal(1.0, 2.0, shape)), as_dtype(rng.normal(size=shape))
  axes, count = (0, 1, 2), a.size // a.shape[-1]
  # The mean's cotangent scaled so that its share of `da` (g_mean / count) is of order 1.
  b, g_mean = rng.normal(size=6).astype(np.float32), (count * rng.normal(size=6)).astype(np.float32)
  (out, mean), vjp = jax.vjp(ops.subtract_batch_mean, jnp.asarray(a, dtype), jnp.asarray(b))
  da, db = vjp((jnp.asarray(g, dtype), jnp.asarray(g_mean)))
  assert out.dtype == da.dtype == dtype and mean.dtype == db.dtype == jnp.float32
  # Mean-only BN's train-mode output and its gradient, with a cotangent for the mean too.
  np_mean = a.mean(axis=axes)
  checks = ((out, a - np_mean + b), (mean, np_mean),
            (da, g + (g_mean - g.sum(axis=axes)) / count))
  for got, want in checks:
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tolerance,
                               atol=tolerance * np.abs(want).max())
  # The bias gradient is a float32 sum of exactly representable values: float32's precision.
  np.testing.assert_allclose(db, g.sum(axis=axes), rtol=1e-5, atol=1e-5 * np.abs(g).sum(axis=0).max())


@pytest.mark.parametrize('backend', BACKENDS)
def test_ops_give_the_kernels_values_and_gradients_on_every_backend(monkeypatch, backend):
  """The accelerator's `lax`/Flax ops and the CPU's kernels compute the same convolution and
  max-pool, values and gradients, against the NumPy oracles above."""
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  rng = np.random.default_rng(11)
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  for kernel_size, stride in (((3, 3), 1), ((3, 3), 2), ((1, 1), 2)):
    w = rng.normal(size=(*kernel_size, 3, 4)).astype(np.float32)
    out, vjp = jax.vjp(lambda a, b, stride=stride: ops.conv2d(a, b, 'SAME', stride), x, w)
    out_grad = rng.normal(size=out.shape).astype(np.float32)
    np_dx, np_dw = _np_conv_gradients(x, w, 'SAME', out_grad, stride)
    for got, want in ((out, _np_project(x, w, 'SAME', stride)),
                      *zip(vjp(out_grad), (np_dx, np_dw))):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f'{kernel_size} {stride}')
  pooled = np.random.default_rng(3).integers(0, 3, (2, 4, 6, 3)).astype(np.float32)  # Ties.
  out, vjp = jax.vjp(ops.max_pool_2x2, pooled)
  out_grad = rng.normal(size=out.shape).astype(np.float32)
  np.testing.assert_array_equal(vjp(out_grad)[0], _np_max_pool_2x2_gradient(pooled, out_grad))
