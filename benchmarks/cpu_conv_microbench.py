"""One ConvLarge convolution at a time: forward, input gradient and kernel gradient, JAX and PyTorch.

    python -m benchmarks.cpu_conv_microbench --width 32 --batch 128 [--conv lax] [--repeats 3]
        [--dtype bfloat16]

For every convolution of the network (`LAYERS`) at `--width` and `--batch`,
times under `jax.jit` the forward `conv(x, w)`, the input gradient (the VJP
with respect to `x`) and the kernel gradient (the VJP with respect to `w`),
each alone, and the same three with PyTorch (`F.conv2d`,
`torch.ops.aten.convolution_backward` with one output mask at a time, the
op PyTorch's autograd calls). Each framework runs in a process of its own
(`--framework`), one after the other, `--repeats` times alternating, so that
both see the same load. The JAX processes call `lcmt_jax.xla_cpu.configure` first, as
`train.py` does, so XLA:CPU runs the convolutions with Eigen;
`LCMT_XLA_CPU_FLAGS=0` in the environment (or `--xla_flags` naming the flag)
leaves XLA's default, YNNPACK. `--xla_flags` sets `XLA_FLAGS` of the JAX
processes only. The table gives the median milliseconds of each and GFLOP/s
(2 per multiply-accumulate, padding included), and the 1-minute load average
before and after.

`--conv` picks the JAX convolution: `models` (`ops.conv2d`, what the model
uses, on the CPU `xla_cpu.kernels.conv2d`, whose VJP writes the kernel gradient in the form XLA:CPU gives to Eigen)
or `lax` (`lax.conv_general_dilated` and JAX's own transpose rules). `--dtype`
sets the arrays' type in both frameworks (bfloat16: what the CPU's AMX units
multiply).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# (name, input size, kernel size, padding, channel multiplier in, out) at width w.
LAYERS = (('conv1a', 32, 3, 1, 0, 1), ('conv1b', 32, 3, 1, 1, 1),
          ('conv2a', 16, 3, 1, 1, 2), ('conv2b', 16, 3, 1, 2, 2),
          ('conv3a', 8, 3, 0, 2, 4), ('conv3b', 6, 1, 0, 4, 2), ('conv3c', 6, 1, 0, 2, 1))
PARTS = ('forward', 'input_grad', 'kernel_grad')


def shapes(width: int):
  for name, size, k, pad, cin, cout in LAYERS:
    yield name, size, k, pad, (cin * width if cin else 3), cout * width


def flops(width: int, batch: int, name: str) -> float:
  for n, size, k, pad, cin, cout in shapes(width):
    if n == name:
      out = size + 2 * pad - k + 1
      return 2.0 * batch * out * out * k * k * cin * cout
  raise KeyError(name)


def _time(fn, min_seconds: float = 0.3, max_calls: int = 20) -> float:
  fn()
  calls, start = 0, time.perf_counter()
  while calls < max_calls and (calls < 2 or time.perf_counter() - start < min_seconds):
    fn()
    calls += 1
  return (time.perf_counter() - start) / calls


def run_jax(width: int, batch: int, conv_kind: str, dtype: str) -> dict:
  from lcmt_jax import xla_cpu  # pylint: disable=import-outside-toplevel
  xla_cpu.configure(dtype)  # Before JAX starts.
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from lcmt_jax import ops  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  out = {}
  for name, size, k, pad, cin, cout in shapes(width):
    x = jax.numpy.asarray(rng.normal(size=(batch, size, size, cin)), dtype)
    w = jax.numpy.asarray(rng.normal(size=(k, k, cin, cout)), dtype)
    padding = 'SAME' if pad else 'VALID'
    if conv_kind == 'models':
      conv = lambda x, w, padding=padding: ops.conv2d(x, w, padding)  # pylint: disable=unnecessary-lambda-assignment
    else:
      conv = lambda x, w, padding=padding: jax.lax.conv_general_dilated(  # pylint: disable=unnecessary-lambda-assignment
          x, w, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = conv(x, w)
    g = jax.numpy.asarray(rng.normal(size=y.shape), dtype)
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    out[name] = {'forward': _time(lambda: jax.block_until_ready(fwd(x, w))),
                 'input_grad': _time(lambda: jax.block_until_ready(dx(x, w, g))),
                 'kernel_grad': _time(lambda: jax.block_until_ready(dw(x, w, g)))}
  return out


def run_torch(width: int, batch: int, threads: int, dtype: str) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  rng = np.random.default_rng(0)
  out = {}
  with torch.no_grad():
    for name, size, k, pad, cin, cout in shapes(width):
      x = torch.as_tensor(rng.normal(size=(batch, cin, size, size)), dtype=getattr(torch, dtype))
      w = torch.as_tensor(rng.normal(size=(cout, cin, k, k)), dtype=getattr(torch, dtype))
      y = F.conv2d(x, w, padding=pad)
      g = torch.randn_like(y)

      def backward(mask, x=x, w=w, g=g, pad=pad):
        return torch.ops.aten.convolution_backward(
            g, x, w, None, (1, 1), (pad, pad), (1, 1), False, (0, 0), 1, mask)
      out[name] = {'forward': _time(lambda x=x, w=w, pad=pad: F.conv2d(x, w, padding=pad)),
                   'input_grad': _time(lambda: backward([True, False, False])),
                   'kernel_grad': _time(lambda: backward([False, True, False]))}
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--width', type=int, default=32)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--xla_flags', default=None, help='XLA_FLAGS of the JAX processes')
  parser.add_argument('--conv', choices=('models', 'lax'), default='models')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--torch_threads', type=int, default=os.cpu_count())
  parser.add_argument('--skip_torch', action='store_true')
  parser.add_argument('--framework', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.framework:
    result = (run_jax(args.width, args.batch, args.conv, args.dtype) if args.framework == 'jax'
              else run_torch(args.width, args.batch, args.torch_threads, args.dtype))
    print(json.dumps(result))
    return
  load_before = os.getloadavg()[0]
  runs = {'jax': [], 'torch': []}
  base = [sys.executable, '-m', 'benchmarks.cpu_conv_microbench', '--width', str(args.width),
          '--batch', str(args.batch), '--conv', args.conv, '--dtype', args.dtype,
          '--torch_threads', str(args.torch_threads)]
  for _ in range(args.repeats):
    for framework in ('jax',) if args.skip_torch else ('jax', 'torch'):
      env = dict(os.environ)
      if framework == 'jax' and args.xla_flags is not None:
        env['XLA_FLAGS'] = args.xla_flags
      text = subprocess.run(base + ['--framework', framework], env=env, check=True,
                            capture_output=True, text=True).stdout
      runs[framework].append(json.loads(text.strip().splitlines()[-1]))
  print(f'width {args.width}, batch {args.batch}, XLA_FLAGS={args.xla_flags!r}, '
        f'LCMT_XLA_CPU_FLAGS={os.environ.get("LCMT_XLA_CPU_FLAGS", "")!r}, conv {args.conv}, '
        f'{args.dtype}, median '
        f'of {args.repeats}, 1-min load {load_before:.2f} before, {os.getloadavg()[0]:.2f} after')
  print(f'{"layer":8} {"part":12} {"JAX ms":>9} {"GFLOP/s":>8} {"torch ms":>9} {"GFLOP/s":>8} '
        f'{"JAX/torch time":>15}')
  totals = {f: {p: 0.0 for p in PARTS} for f in runs}
  for name, *_ in LAYERS:
    for part in PARTS:
      med = {f: statistics.median(r[name][part] for r in rs) for f, rs in runs.items() if rs}
      for f, value in med.items():
        totals[f][part] += value
      gflop = flops(args.width, args.batch, name) / 1e9
      t = med.get('torch')
      print(f'{name:8} {part:12} {1e3 * med["jax"]:9.2f} {gflop / med["jax"]:8.1f} '
            + (f'{1e3 * t:9.2f} {gflop / t:8.1f} {med["jax"] / t:15.2f}' if t else ''))
  for part in PARTS:
    j, t = totals['jax'][part], totals['torch'][part] if runs['torch'] else None
    print(f'{"all":8} {part:12} {1e3 * j:9.2f} {"":8} '
          + (f'{1e3 * t:9.2f} {"":8} {j / t:15.2f}' if t else ''))


if __name__ == '__main__':
  main()
