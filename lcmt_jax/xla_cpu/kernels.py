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


def _conv_padding(padding: str, in_size: tuple[int, ...], kernel_size: tuple[int, ...],
                  stride: int) -> list[tuple[int, int]]:
  """`lax`'s explicit padding of a 'SAME' or 'VALID' convolution.

  At stride 1 'SAME' pads `((k - 1) // 2, k // 2)`; at stride 2 on an even
  input it pads `(0, 1)` for a 3x3 kernel (TensorFlow's convention, which
  `lax` and the TensorFlow WRN code share) and nothing for a 1x1 one.
  """
  if padding not in ('SAME', 'VALID'):
    raise ValueError(f'padding must be SAME or VALID, got {padding!r}')
  return jax.lax.padtype_to_pads(in_size, kernel_size, (stride,) * len(kernel_size), padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, w: jax.Array, padding: str, stride: int = 1) -> jax.Array:
  """NHWC x HWIO convolution (same stride on both axes) whose gradients XLA:CPU runs as Eigen
  convolutions.

  The values and gradients are those of `lax.conv_general_dilated` (the same
  three convolutions JAX's own transpose rules produce), but the kernel
  gradient is written in the canonical form XLA:CPU hands to Eigen: the input
  as `[C_in, H, W, N]` (channels as batch, batch as feature) convolved with
  the output gradient as an `[H, W, N, C_out]` kernel. JAX's transpose rule
  gives a convolution with permuted dimension labels, which XLA:CPU's
  canonicalisation rewrites into this form in a plain jitted call but not in a
  loop body: inside `lax.scan` it fell back to XLA's naive convolution loop,
  about 100 times slower (BENCHMARKS.md, "XLA:CPU"). At stride `s` the kernel
  gradient is that convolution with the output gradient dilated by `s` (rhs
  dilation), and the input gradient the transposed convolution: the output
  gradient dilated by `s` (lhs dilation) convolved with the flipped kernel.
  """
  pads = _conv_padding(padding, x.shape[1:3], w.shape[:2], stride)
  return jax.lax.conv_general_dilated(x, w, (stride, stride), pads,
                                      dimension_numbers=_CONV_DIMENSIONS)


def _conv2d_fwd(x, w, padding, stride):
  return conv2d(x, w, padding, stride), (x, w)


def _conv2d_bwd(padding, stride, residuals, g):
  x, w = residuals
  in_size, kernel_size, out_size = x.shape[1:3], w.shape[:2], g.shape[1:3]
  pads = _conv_padding(padding, in_size, kernel_size, stride)
  # The last input row a window reads, minus the last row of the dilated output gradient,
  # per axis: rows past it (a strided window's unused tail) get no gradient.
  tails = [n + lo - (o - 1) * stride - 1 for n, (lo, _), o in zip(in_size, pads, out_size)]
  with jax.named_scope('input_grad'):
    # The kernel flipped in space, input and output channels swapped.
    flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = jax.lax.conv_general_dilated(
        g, flipped, (1, 1), [(k - 1 - lo, tail) for k, (lo, _), tail in
                             zip(kernel_size, pads, tails)],
        lhs_dilation=(stride, stride), dimension_numbers=_CONV_DIMENSIONS)
  with jax.named_scope('kernel_grad'):
    dw = jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1),
        [(lo, k - 1 - tail) for k, (lo, _), tail in zip(kernel_size, pads, tails)],
        rhs_dilation=(stride, stride), dimension_numbers=_CONV_DIMENSIONS)  # [C_in, kh, kw, C_out]
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
