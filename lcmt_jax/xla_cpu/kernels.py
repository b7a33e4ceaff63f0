"""A convolution and a max-pool whose gradients XLA:CPU runs fast: same values, other forms.

Each computes exactly what `lax.conv_general_dilated` and `flax.linen.max_pool`
compute; only the form of the gradient differs. `lcmt_jax.ops` uses them on
the CPU and the `lax`/Flax ops elsewhere, whose gradients XLA:GPU maps onto
cuDNN's backward kernels.
"""

import functools

import jax
import jax.numpy as jnp

_CONV_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


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
  about 100 times slower (BENCHMARKS.md, "XLA:CPU").
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
