"""ConvLarge with weight-normalised, mean-only batch-normalised layers.

docs/reference.md "Model": every conv and the final dense layer is
`W = g * v / sqrt(sum(v^2) + 1e-8)` followed by mean-only batch norm, and the
network is started by the data-dependent initialisation of Salimans and Kingma
(2016). The 128-d pooled feature vector is recorded with `sow` in the
`intermediates` collection under the name `features`.
"""

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcmt_jax import ops

_EPS = 1e-8


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
      out, batch_mean = ops.subtract_batch_mean(a, b)
    if not self.is_initializing():
      running_mean.value = ((1.0 - self.momentum) * running_mean.value
                            + self.momentum * jax.lax.stop_gradient(batch_mean))
    return out

  def _project(self, x: jax.Array, w: jax.Array) -> jax.Array:
    if not self.kernel_size:
      return x @ w
    return ops.conv2d(x, w, self.padding)


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

  # Started by `models.initialize` with a pass in `init_mode` (docs/reference.md "Model").
  data_dependent_init: ClassVar[bool] = True

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
        h = ops.max_pool_2x2(h)
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
    self.sow('intermediates', 'features', features)  # models.FEATURES
    logits = layer(self.num_classes, kernel_size=(), init_scale=0.1, name='dense')(
        features, train=train, init_mode=init_mode)
    return logits.astype(jnp.float32)
