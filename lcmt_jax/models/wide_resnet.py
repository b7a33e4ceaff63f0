"""WRN-28-2, the wide residual network of the semi-supervised literature's tables.

The definition is that of Oliver et al. (2018, "Realistic evaluation of deep
semi-supervised learning algorithms") as the MixMatch and FixMatch code
builds it (TensorFlow): a 3x3 stem of 16 channels, three groups of four
pre-activation residual blocks of 32, 64 and 128 channels (the second and
third groups start at stride 2), batch norm and leaky ReLU 0.1, global
average pooling and a dense classifier; 1,467,610 parameters for 10 classes.

A block is `x + conv3x3(act(bn(conv3x3(act(bn(x))))))`, with `act` the leaky
ReLU 0.1 and a 1x1 projection of `x` (at the block's stride) where the shape
changes. The shortcut takes the block's raw input, except in the first block
of the network ("activate before residual"), whose shortcut takes the
activated input `act(bn(x))`, as in the MixMatch/FixMatch code. (Some PyTorch
ports differ here: the popular one skips the first BN of the first block of
groups 2 and 3; this module follows the TensorFlow code.)

Details taken from that code: batch norm momentum 0.001 (`config.bn_momentum`,
Flax momentum 0.999) and epsilon 0.001 (TensorFlow's default); convolutions
without bias (each is followed by batch norm or the residual sum of a block
whose input is normalised next), He-normal kernels over the fan-out; 'SAME'
padding in TensorFlow's convention (`lax`'s: a stride-2 3x3 conv pads one
pixel at the bottom and right only); a final batch norm and leaky ReLU before
the pooling; the pooled vector is the feature vector, sown as
`intermediates/features` (`models.FEATURES`).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcmt_jax import ops

BN_EPSILON = 1e-3  # TensorFlow's default, which the MixMatch/FixMatch WRN uses.
BLOCKS_PER_GROUP = 4  # Depth 28 = 6 * 4 + 4.
LEAKY_SLOPE = 0.1


class Conv(nn.Module):
  """A bias-free 'SAME' convolution through `ops.conv2d`, He-normal over the fan-out."""

  features: int
  kernel_size: int = 3
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    return ops.conv2d(x.astype(self.dtype), kernel.astype(self.dtype), 'SAME', self.stride)


class ResidualBlock(nn.Module):
  """A pre-activation residual block; see the module docstring for its form."""

  features: int
  stride: int = 1
  activate_before_residual: bool = False
  dropout_rate: float = 0.0
  bn_momentum: float = 0.001
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=1.0 - self.bn_momentum, epsilon=BN_EPSILON, dtype=self.dtype)
    conv = functools.partial(Conv, self.features, dtype=self.dtype)
    activated = nn.leaky_relu(norm(name='bn1')(x), LEAKY_SLOPE)
    shortcut = activated if self.activate_before_residual else x
    h = conv(stride=self.stride, name='conv1')(activated)
    h = nn.leaky_relu(norm(name='bn2')(h), LEAKY_SLOPE)
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = conv(name='conv2')(h)
    if x.shape[-1] != self.features or self.stride != 1:
      shortcut = conv(kernel_size=1, stride=self.stride, name='shortcut')(shortcut)
    return shortcut.astype(self.dtype) + h


class WideResNet(nn.Module):
  """WRN-28-2 with its feature size `width` (128 for the standard network).

  Channels are `width // 8` in the stem and `width // 4, width // 2, width` in
  the three groups, so narrow nets for tests keep the standard shape.
  `dropout_rate` is the rate between the two convolutions of every block (0
  in WRN-28-2 as the semi-supervised literature trains it).
  """

  num_classes: int = 10
  width: int = 128
  dropout_rate: float = 0.0
  bn_momentum: float = 0.001
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.width % 8:
      raise ValueError(f'WideResNet width must be a multiple of 8, got {self.width}')
    block = functools.partial(ResidualBlock, dropout_rate=self.dropout_rate,
                              bn_momentum=self.bn_momentum, dtype=self.dtype)
    h = Conv(self.width // 8, dtype=self.dtype, name='stem')(x)
    for group, features in enumerate((self.width // 4, self.width // 2, self.width)):
      for i in range(BLOCKS_PER_GROUP):
        h = block(features, stride=2 if group and not i else 1,
                  activate_before_residual=not (group or i),
                  name=f'group{group + 1}_block{i + 1}')(h, train=train)
    h = nn.BatchNorm(use_running_average=not train, momentum=1.0 - self.bn_momentum,
                     epsilon=BN_EPSILON, dtype=self.dtype, name='bn_final')(h)
    h = nn.leaky_relu(h, LEAKY_SLOPE)
    features = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    self.sow('intermediates', 'features', features)  # models.FEATURES
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      kernel_init=nn.initializers.glorot_normal(), name='dense')(features)
    return logits.astype(jnp.float32)
