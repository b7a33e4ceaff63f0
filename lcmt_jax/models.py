"""ConvLarge with weight-normalised, mean-only batch-normalised layers.

REFERENCE.md "Model": every conv and the final dense layer is
`W = g * v / sqrt(sum(v^2) + 1e-8)` followed by mean-only batch norm, and the
network is started by the data-dependent initialisation of Salimans and Kingma
(2016). The 128-d pooled feature vector is recorded with `sow` in the
`intermediates` collection under the name `features`.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

_EPS = 1e-8


_CONV_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _on_cpu() -> bool:
  """Whether the code being traced will run on XLA:CPU (JAX's default backend).

  `conv2d` and `max_pool_2x2` compute exactly what `lax.conv_general_dilated`
  and `nn.max_pool` compute, in the forms XLA:CPU runs fast; elsewhere the
  model keeps the `lax` and Flax ops, whose gradients XLA:GPU maps onto
  cuDNN's backward kernels.
  """
  return jax.default_backend() == 'cpu'


def _conv_padding(padding: str, kernel_size: tuple[int, ...]) -> list[tuple[int, int]]:
  """`lax`'s explicit padding of a stride-1 'SAME' or 'VALID' convolution."""
  if padding == 'SAME':
    return [((k - 1) // 2, k // 2) for k in kernel_size]
  if padding == 'VALID':
    return [(0, 0)] * len(kernel_size)
  raise ValueError(f'padding must be SAME or VALID, got {padding!r}')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x: jax.Array, w: jax.Array, padding: str) -> jax.Array:
  """Stride-1 NHWC x HWIO convolution whose gradients XLA:CPU runs as Eigen convolutions.

  The values and gradients are those of `lax.conv_general_dilated` (the same
  three convolutions JAX's own transpose rules produce), but the kernel
  gradient is written in the canonical form XLA:CPU hands to Eigen: the input
  as `[C_in, H, W, N]` (channels as batch, batch as feature) convolved with
  the output gradient as an `[H, W, N, C_out]` kernel. JAX's transpose rule
  gives a convolution with permuted dimension labels, which XLA:CPU's
  canonicalisation rewrites into this form in a plain jitted call but not in a
  loop body: inside `lax.scan` it fell back to XLA's naive convolution loop,
  about 100 times slower (BENCHMARKS.md, "CPU").
  """
  return jax.lax.conv_general_dilated(x, w, (1, 1), _conv_padding(padding, w.shape[:2]),
                                      dimension_numbers=_CONV_DIMENSIONS)


def _conv2d_fwd(x, w, padding):
  return conv2d(x, w, padding), (x, w)


def _conv2d_bwd(padding, residuals, g):
  x, w = residuals
  kernel_size = w.shape[:2]
  pads = _conv_padding(padding, kernel_size)
  with jax.named_scope('input_grad'):
    # The kernel flipped in space, input and output channels swapped.
    flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = jax.lax.conv_general_dilated(
        g, flipped, (1, 1), [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel_size, pads)],
        dimension_numbers=_CONV_DIMENSIONS)
  with jax.named_scope('kernel_grad'):
    dw = jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), pads,
        dimension_numbers=_CONV_DIMENSIONS)  # [C_in, kh, kw, C_out]
  return dx, dw.transpose(1, 2, 0, 3)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """`nn.max_pool(x, (2, 2), strides=(2, 2))` on NHWC input, with a gradient XLA:CPU runs fast.

  The forward is a max over the four taps of each window. The gradient goes,
  as PyTorch's and XLA's `select_and_scatter` route it, to one tap per window:
  the first maximum in row-major order. JAX's own gradient of a max-pool
  computes each window's argmax with index iotas, a variadic reduce-window and
  a scatter, which XLA:CPU runs several times slower than these elementwise
  selects (BENCHMARKS.md, "CPU"). An odd trailing row or column is dropped, as
  VALID pooling drops it.
  """
  return _max_pool_2x2(x)


def _max_pool_2x2(x):
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _max_pool_2x2_fwd(x):
  y = _max_pool_2x2(x)
  return y, (x, y)


def _max_pool_2x2_bwd(residuals, g):
  x, y = residuals
  n, h, w, c = x.shape
  windows = x[:, :h - h % 2, :w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c)
  is_max = windows == y[:, :, None, :, None, :]
  top_left, top_right, bottom_left = is_max[:, :, 0, :, 0], is_max[:, :, 0, :, 1], is_max[:, :, 1, :, 0]
  zero = jnp.zeros_like(g)
  # First maximum in row-major order; the bottom-right tap takes what is left.
  picks = (top_left, top_right & ~top_left, bottom_left & ~(top_left | top_right),
           ~(top_left | top_right | bottom_left))
  taps = [jnp.where(pick, g, zero) for pick in picks]
  grad = jnp.stack([jnp.stack(taps[:2], axis=3), jnp.stack(taps[2:], axis=3)], axis=2)
  grad = grad.reshape(n, h - h % 2, w - w % 2, c)
  return (jnp.pad(grad, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


def _subtract_batch_mean(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(a - (mean(a) - b), mean(a))`, the mean over every axis but the last, in float32."""
  mean = jnp.mean(a, axis=tuple(range(a.ndim - 1)), dtype=jnp.float32)
  return a - (mean - b).astype(a.dtype), mean


@jax.custom_vjp
def subtract_batch_mean(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`_subtract_batch_mean` (mean-only batch norm in train mode) with a gradient XLA:CPU runs fast.

  The gradient is the one autodiff derives (`da = g - sum(g) / count`,
  `db = sum(g)`), written as one float32 reduction of `g` and one elementwise
  pass. Autodiff's form, a negated float32 copy of `g` and a tree reduction of
  it for each of the two sums, was the largest part of the CPU's bfloat16 step
  (BENCHMARKS.md).
  """
  return _subtract_batch_mean(a, b)


def _subtract_batch_mean_fwd(a, b):
  return _subtract_batch_mean(a, b), None


def _subtract_batch_mean_bwd(_, cotangents):
  g, g_mean = cotangents
  g_sum = jnp.sum(g, axis=tuple(range(g.ndim - 1)), dtype=jnp.float32)
  count = g.size // g.shape[-1]
  return g + ((g_mean - g_sum) / count).astype(g.dtype), g_sum


subtract_batch_mean.defvjp(_subtract_batch_mean_fwd, _subtract_batch_mean_bwd)


class WeightNormMeanOnlyBN(nn.Module):
  """A weight-normalised conv (dense when `kernel_size` is empty) with mean-only BN.

  Train mode subtracts the batch mean of `xW` (per channel, over batch and
  space) and updates the running mean with `momentum`; eval mode subtracts the
  running mean. With `init_mode=True` the call performs the data-dependent
  initialisation instead: it rewrites `g` and `b` (apply with
  `mutable=['params']`) and returns `(xW - m) * init_scale / s`, leaving the
  running mean untouched, as the reference does.
  """

  features: int
  kernel_size: tuple[int, ...] = (3, 3)
  padding: str = 'SAME'
  init_scale: float = 1.0
  momentum: float = 0.001
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, init_mode: bool = False) -> jax.Array:
    kernel_shape = (*self.kernel_size, x.shape[-1], self.features)
    v = self.param('v', nn.initializers.normal(0.05), kernel_shape)
    g = self.param('g', nn.initializers.ones, (self.features,))
    b = self.param('b', nn.initializers.zeros, (self.features,))
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (self.features,))

    fan_in_axes = tuple(range(v.ndim - 1))
    with jax.named_scope('weight_norm'):  # Labels the profile (benchmarks/profile_summary.py).
      w = v * (g / jnp.sqrt(jnp.sum(v**2, axis=fan_in_axes) + _EPS))
    a = self._project(x.astype(self.dtype), w.astype(self.dtype))

    if init_mode:
      stat_axes = tuple(range(a.ndim - 1))
      batch_mean = jnp.mean(a, axis=stat_axes, dtype=jnp.float32)
      centred = a.astype(jnp.float32) - batch_mean
      scale = self.init_scale / jnp.sqrt(jnp.mean(centred**2, axis=stat_axes) + _EPS)
      self.put_variable('params', 'g', g * scale)
      self.put_variable('params', 'b', -batch_mean * scale)
      return (centred * scale).astype(self.dtype)

    with jax.named_scope('batch_norm'):  # Labels the profile (benchmarks/profile_summary.py).
      if not train:
        return a - (running_mean.value - b).astype(self.dtype)
      # The same values everywhere; on the CPU with the gradient written for XLA:CPU.
      out, batch_mean = (subtract_batch_mean if _on_cpu() else _subtract_batch_mean)(a, b)
    if not self.is_initializing():
      running_mean.value = ((1.0 - self.momentum) * running_mean.value
                            + self.momentum * jax.lax.stop_gradient(batch_mean))
    return out

  def _project(self, x: jax.Array, w: jax.Array) -> jax.Array:
    if not self.kernel_size:
      return x @ w
    if len(self.kernel_size) == 2 and self.padding in ('SAME', 'VALID') and _on_cpu():
      return conv2d(x, w, self.padding)
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(1,) * len(self.kernel_size), padding=self.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class ConvLarge(nn.Module):
  """The reference's "ShallowNet": 9 convs and a dense layer, 3.1 M parameters at width 128.

  Channel widths are `w, w, w | 2w, 2w, 2w | 4w, 2w, w` with `w = width`, so
  narrow nets for tests keep the reference's shape. Returns the logits; the
  `w`-d feature vector is sown as `intermediates/features`.
  """

  num_classes: int = 10
  width: int = 128
  dropout_rate: float = 0.5
  bn_momentum: float = 0.001
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, init_mode: bool = False) -> jax.Array:
    w = self.width
    layer = functools.partial(WeightNormMeanOnlyBN, momentum=self.bn_momentum, dtype=self.dtype)
    # The reference's dropout is active during the initialisation pass too.
    deterministic = not (train or init_mode)

    def conv(h, name, features, kernel_size=(3, 3), padding='SAME'):
      h = layer(features, kernel_size=kernel_size, padding=padding, name=name)(
          h, train=train, init_mode=init_mode)
      return nn.leaky_relu(h, negative_slope=0.1)

    def pool_and_drop(h):
      with jax.named_scope('max_pool'):
        h = max_pool_2x2(h) if _on_cpu() else nn.max_pool(h, (2, 2), strides=(2, 2))
      return nn.Dropout(self.dropout_rate, deterministic=deterministic)(h)

    # Block 1 is preceded by dropout 0.0 in the reference: a no-op, omitted.
    h = conv(x, 'conv1a', w)
    h = conv(h, 'conv1b', w)
    h = pool_and_drop(conv(h, 'conv1c', w))
    h = conv(h, 'conv2a', 2 * w)
    h = conv(h, 'conv2b', 2 * w)
    h = pool_and_drop(conv(h, 'conv2c', 2 * w))
    h = conv(h, 'conv3a', 4 * w, padding='VALID')
    h = conv(h, 'conv3b', 2 * w, kernel_size=(1, 1))
    h = conv(h, 'conv3c', w, kernel_size=(1, 1))
    features = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    self.sow('intermediates', 'features', features)
    logits = layer(self.num_classes, kernel_size=(), init_scale=0.1, name='dense')(
        features, train=train, init_mode=init_mode)
    return logits.astype(jnp.float32)


def init_variables(model: ConvLarge, key: jax.Array, images: jax.Array) -> dict:
  """Random initial `params` and `batch_stats` (before the data-dependent pass)."""
  variables = model.init({'params': key}, images, train=False)
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def data_dependent_init(model: ConvLarge, variables: dict, images: jax.Array,
                        dropout_key: jax.Array) -> dict:
  """Sets every layer's `g` and `b` from one batch, layer by layer (REFERENCE.md, "Model")."""
  _, updated = model.apply(variables, images, train=True, init_mode=True,
                           mutable=['params'], rngs={'dropout': dropout_key})
  return {**variables, 'params': updated['params']}


def apply_with_features(apply_fn: Callable, variables: dict, images: jax.Array, *, train: bool,
                        dropout_key: jax.Array | None = None):
  """Runs `apply_fn` (a `ConvLarge.apply`) and returns `(logits, features, new_batch_stats)`.

  In eval mode `new_batch_stats` is `variables['batch_stats']` unchanged.
  """
  mutable = ['intermediates', 'batch_stats'] if train else ['intermediates']
  rngs = {'dropout': dropout_key} if dropout_key is not None else {}
  logits, state = apply_fn(variables, images, train=train, mutable=mutable, rngs=rngs)
  batch_stats = state['batch_stats'] if train else variables['batch_stats']
  return logits, state['intermediates']['features'][0], batch_stats
