"""The operations the networks call, each choosing its implementation for the backend.

The model says `ops.conv2d`; which form runs is decided here, from the
backend the code is traced for:
- `conv2d`, `max_pool_2x2`: on XLA:CPU the kernels of `lcmt_jax.xla_cpu.kernels`
  (same values, gradients in forms XLA:CPU runs fast); on an accelerator
  `lax.conv_general_dilated` and Flax's max-pool, whose gradients XLA:GPU hands
  to cuDNN.
- `subtract_batch_mean`: one implementation on every backend, so that a
  bfloat16 run computes the same arithmetic on the CPU and on a GPU: its mean
  and both sums of its gradient accumulate in float32.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcmt_jax.xla_cpu import kernels

_CONV_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _on_xla_cpu() -> bool:
  """Whether the code being traced will run on XLA:CPU (JAX's default backend)."""
  return jax.default_backend() == 'cpu'


def conv2d(x: jax.Array, w: jax.Array, padding: str, stride: int = 1) -> jax.Array:
  """NHWC x HWIO convolution, 'SAME' or 'VALID' as `lax` pads them, `stride` on both axes."""
  if _on_xla_cpu():
    return kernels.conv2d(x, w, padding, stride)
  return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                      dimension_numbers=_CONV_DIMENSIONS)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 on NHWC input; the gradient goes to each window's first maximum."""
  if _on_xla_cpu():
    return kernels.max_pool_2x2(x)
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def _centre(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  mean = jnp.mean(a, axis=tuple(range(a.ndim - 1)), dtype=jnp.float32)
  return a - (mean - b).astype(a.dtype), mean


@jax.custom_vjp
def subtract_batch_mean(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean-only batch norm in train mode: `(a - mean(a) + b, mean(a))`, the mean per channel.

  The mean is over every axis but the last, in float32. The gradient is the
  one autodiff derives (`da = g + (g_mean - sum(g)) / count`, `db = sum(g)`),
  written as one float32 reduction of `g` and one elementwise pass: autodiff's
  own form sums `g` in the compute dtype (bfloat16 loses most of the bias
  gradient's bits) and, on the CPU, took the largest part of the bf16 step
  (BENCHMARKS.md).
  """
  return _centre(a, b)


def _subtract_batch_mean_fwd(a, b):
  return _centre(a, b), None


def _subtract_batch_mean_bwd(_, cotangents):
  g, g_mean = cotangents
  g_sum = jnp.sum(g, axis=tuple(range(g.ndim - 1)), dtype=jnp.float32)
  count = g.size // g.shape[-1]
  return g + ((g_mean - g_sum) / count).astype(g.dtype), g_sum


subtract_batch_mean.defvjp(_subtract_batch_mean_fwd, _subtract_batch_mean_bwd)
