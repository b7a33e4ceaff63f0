"""Training throughput of the JAX step against the PyTorch port's.

    python -m benchmarks.throughput --steps 20 --warmup 2 --epoch --epoch_dtypes float32,bfloat16

Rows (each at the full ConvLarge and a 32 + 128 batch unless flags say otherwise;
`--model wrn28_2` times WRN-28-2 instead, in JAX and in PyTorch):

- JAX step, float32 and bfloat16 compute (`ConvLarge(dtype=...)`), and
  `float32-highest` (float32 with `jax.default_matmul_precision('highest')`, no
  TF32 on GPUs): `train_step` on one fixed batch already on the device. On an accelerator the timed steps
  run in one `lax.scan` (on the CPU too, since `ops.conv2d` writes its
  kernel gradient in the form XLA:CPU runs fast inside a loop; BENCHMARKS.md,
  "CPU"), unless `--steps_per_call` says otherwise.
- With `--epoch`, JAX epoch rows: one epoch end to end over synthetic uint8
  CIFAR-size data through `experiment.run_steps` (sampling and augmentation inside
  `jit`).
- PyTorch rows, unless `--skip_torch`: `benchmarks.torch_throughput` (its
  docstring describes them: eager float32, bfloat16 autocast + channels_last,
  `torch.compile`, and with `--epoch` epochs fed from the host or from the
  reference's DataLoader), run after the JAX rows in a subprocess that never
  imports JAX, so that the frameworks do not share a GPU process. Its rows come
  back as JSON. With JAX's default preallocation it gets the quarter of the GPU
  that JAX left, far more than this model needs. `--torch_rows` picks the rows.

On the CPU, `lcmt_jax.xla_cpu.configure`, called first as `train.py` calls it, adds the
XLA:CPU flag that keeps convolutions off YNNPACK unless `XLA_FLAGS` sets it already or
`LCMT_XLA_CPU_FLAGS=0`, and a run whose JAX rows are all bfloat16 also gets the flag
that runs bf16 convolutions on oneDNN (it slows float32, so time the two types in
separate runs); the header prints the `XLA_FLAGS` the run used.

`vs PyTorch` compares each step row with `PyTorch step float32` and each epoch
row with `PyTorch epoch float32`; a row that could not be measured (a
`torch.compile` past `--torch_compile_budget`, or one that raised) prints n/a
and says why in its note.

Images per second count each labelled and unlabelled image once per step
(160 at the reference's batch), whatever the number of passes over it.

Model FLOP utilisation (accelerators only) uses an analytic count: a step is
the student's forward and backward (3x a forward) plus the teacher's forward
(1x), each over all 160 images, so 4 x `forward_flops` x 160; a forward counts
2 FLOPs per multiply-accumulate of the convolutions and the dense layer and
ignores pooling, weight norm, batch means, activations and losses (<1%).
Float32 rows are rated against the TF32 peak, the precision both frameworks
give float32 convolutions on these GPUs by default.
"""

import argparse
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import common
from benchmarks import profile_summary
from benchmarks.common import Row
from configs import cifar10_wrn
from configs import default as default_config
from lcmt_jax import experiment
from lcmt_jax import input_pipeline
from lcmt_jax import train_state
from lcmt_jax import xla_cpu

REFERENCE_EPOCHS = 1000
# Dense peak TFLOP/s by device name: (bfloat16, TF32, float32 without tensor cores).
# First match wins, so a more specific name comes first.
PEAK_TFLOPS = (
    ('H100 PCIe', {'bfloat16': 756.0, 'tf32': 378.0, 'float32': 51.0}),
    ('H100', {'bfloat16': 989.0, 'tf32': 494.0, 'float32': 67.0}),  # SXM
    ('H200', {'bfloat16': 989.0, 'tf32': 494.0, 'float32': 67.0}),
)


def forward_flops(width: int, num_classes: int = 10, image_size: int = 32,
                  model: str = 'convlarge') -> int:
  """FLOPs (2 per multiply-accumulate) of one image's forward: convs and the dense layer."""
  w, s = width, image_size
  if model == 'wrn28_2':
    # (output side, kernel size, input channels, output channels): stem, then per group a first
    # block (3x3, 3x3, 1x1 projection) and three blocks of two 3x3 convs.
    layers = [(s, 3, 3, w // 8)]
    for group, (c_in, c) in enumerate(((w // 8, w // 4), (w // 4, w // 2), (w // 2, w))):
      side = s >> group
      layers += [(side, 3, c_in, c), (side, 3, c, c), (side, 1, c_in, c)] + [(side, 3, c, c)] * 6
  else:
    layers = [(s, 3, 3, w), (s, 3, w, w), (s, 3, w, w),
              (s // 2, 3, w, 2 * w), (s // 2, 3, 2 * w, 2 * w), (s // 2, 3, 2 * w, 2 * w),
              (s // 4 - 2, 3, 2 * w, 4 * w), (s // 4 - 2, 1, 4 * w, 2 * w),
              (s // 4 - 2, 1, 2 * w, w)]
  layers.append((1, 1, w, num_classes))
  return 2 * sum(out * out * k * k * cin * cout for out, k, cin, cout in layers)


def step_flops(width: int, images_per_step: int, model: str = 'convlarge') -> int:
  """Student forward + backward (3 forwards) and teacher forward (1) over every image."""
  return 4 * forward_flops(width, model=model) * images_per_step


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The dense peak a row is rated against: bf16, TF32 for float32, plain float32 for `-highest`."""
  kind = {'bfloat16': 'bfloat16', 'float32-highest': 'float32'}.get(dtype, 'tf32')
  for name, peaks in PEAK_TFLOPS:
    if name in device_kind:
      return peaks[kind]
  return None


# --- JAX ----------------------------------------------------------------------------------------

def matmul_precision(dtype: str):
  """`float32-highest` is float32 with `jax.default_matmul_precision('highest')`: no TF32."""
  return jax.default_matmul_precision('highest' if dtype.endswith('-highest') else None)


def jax_setup(args, dtype: str, steps_per_epoch: int):
  """The benchmark's config, step config and a replicated initial state (the CPU profile's too)."""
  # WRN-28-2 under the reference's recipe: the same optimiser as ConvLarge's rows.
  config = (cifar10_wrn.get_config() if args.model == 'wrn28_2' else default_config.get_config())
  config.update(width=args.width, labeled_batch_size=args.labeled_batch,
                unlabeled_batch_size=args.unlabeled_batch, compute_dtype=dtype.split('-')[0])
  step_config = train_state.StepConfig.from_config(config, steps_per_epoch)
  model = experiment.build_model(config, num_classes=10)
  tx = train_state.make_optimizer(config, step_config)
  rng = np.random.default_rng(0)
  init_images = jnp.asarray(rng.normal(size=(args.labeled_batch, 32, 32, 3)), jnp.float32)
  # Every jitted call returns its state with this sharding, so the first timed call
  # sees the same input signature as the warm-up (no recompilation).
  state = jax.jit(functools.partial(train_state.create_train_state, model, tx,
                                    teacher_init='independent'),
                  out_shardings=_replicated())(jax.random.key(0), init_images, init_images)
  return config, step_config, state


def random_step_batch(args) -> dict[str, jax.Array]:
  """One `train_step` batch of random images and labels in the benchmark's batch sizes."""
  rng = np.random.default_rng(1)
  images = lambda n: jnp.asarray(rng.normal(size=(n, 32, 32, 3)), jnp.float32)  # pylint: disable=unnecessary-lambda-assignment
  return {'labeled_student': images(args.labeled_batch),
          'labeled_teacher': images(args.labeled_batch),
          'labels': jnp.asarray(rng.integers(0, 10, args.labeled_batch), jnp.int32),
          'unlabeled_student': images(args.unlabeled_batch),
          'unlabeled_teacher': images(args.unlabeled_batch)}


def _replicated() -> NamedSharding:
  return NamedSharding(experiment.make_mesh(), PartitionSpec())


def _time_calls(fn, state, num_calls: int, warmup_calls: int):
  """Seconds of `num_calls` calls of `state = fn(state)` after `warmup_calls` untimed ones."""
  for _ in range(warmup_calls):
    state = fn(state)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(num_calls):
    state = fn(state)
  jax.block_until_ready(state)
  return time.perf_counter() - start


def jax_step_row(args, dtype: str) -> Row:
  """`train_step` on one fixed device batch, the timed steps in one scan unless told otherwise."""
  with matmul_precision(dtype):
    return _jax_step_row(args, dtype)


def _jax_step_row(args, dtype: str) -> Row:
  _, step_config, state = jax_setup(args, dtype, common.CIFAR10_UNLABELED // args.unlabeled_batch)
  batch = random_step_batch(args)
  steps_per_call = args.steps_per_call or args.steps

  @functools.partial(jax.jit, donate_argnums=0, out_shardings=_replicated(),
                     compiler_options=xla_cpu.compiler_options())  # As the trainer's.
  def run(state, batch):
    one_step = lambda s, _: train_state.train_step(s, batch, step_config)  # pylint: disable=unnecessary-lambda-assignment
    if steps_per_call == 1:
      return one_step(state, None)
    return jax.lax.scan(one_step, state, length=steps_per_call)

  fn = lambda s: run(s, batch)[0]  # pylint: disable=unnecessary-lambda-assignment
  start = time.perf_counter()
  state = fn(state)  # Compiles.
  jax.block_until_ready(state)
  compile_seconds = time.perf_counter() - start
  num_calls = math.ceil(args.steps / steps_per_call)
  warmup_calls = math.ceil(args.warmup / steps_per_call)
  seconds = _time_calls(fn, state, num_calls, warmup_calls) / (num_calls * steps_per_call)
  return Row(f'JAX step {dtype.replace("-", " ")}', (args.labeled_batch + args.unlabeled_batch) / seconds, seconds,
             dtype, note=f'compile + first call {compile_seconds:.0f} s, {steps_per_call} step'
             f'{"s" if steps_per_call > 1 else ""} per call')


def jax_epoch_row(args, dtype: str, data: dict[str, np.ndarray], profile_dir: str = '') -> Row:
  """One epoch of `experiment.run_steps` over on-device data, compiled beforehand.

  With `profile_dir`, one more epoch runs under `jax.profiler.trace` and its
  summary (`benchmarks.profile_summary`) is printed.
  """
  with matmul_precision(dtype):
    return _jax_epoch_row(args, dtype, data, profile_dir)


def _jax_epoch_row(args, dtype: str, data: dict[str, np.ndarray], profile_dir: str) -> Row:
  steps_per_epoch = len(data['unlabeled_images']) // args.unlabeled_batch
  config, step_config, state = jax_setup(args, dtype, steps_per_epoch)
  device_data = jax.device_put(data, _replicated())
  run = experiment.make_train_fn(config, step_config, input_pipeline.DATASETS['cifar10'],
                              experiment.make_mesh())
  data_key = jax.random.key(1)
  steps_per_call = min(args.steps_per_call or steps_per_epoch, steps_per_epoch)
  calls = [min(steps_per_call, steps_per_epoch - s) for s in range(0, steps_per_epoch, steps_per_call)]
  start = time.perf_counter()
  compiled = {n: run.lower(state, device_data, data_key, num_steps=n).compile()
              for n in sorted(set(calls))}  # Every call shape, outside the timing.
  compile_seconds = time.perf_counter() - start

  def epoch(state):
    for num_steps in calls:
      state, metrics = compiled[num_steps](state, device_data, data_key)
      jax.device_get(metrics)  # As the trainer does after every call.
    return state

  state = epoch(state)  # Warm-up.
  jax.block_until_ready(state)
  start = time.perf_counter()
  state = jax.block_until_ready(epoch(state))
  seconds = time.perf_counter() - start
  if profile_dir:
    os.makedirs(profile_dir, exist_ok=True)
    with open(os.path.join(profile_dir, 'hlo.txt'), 'w') as f:
      f.write(compiled[calls[0]].as_text())
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      jax.block_until_ready(epoch(state))
    print(f'Profile of one JAX epoch, {dtype}, {steps_per_epoch} steps:\n'
          + profile_summary.summarize(profile_dir, steps_per_epoch), file=sys.stderr, flush=True)
  images = steps_per_epoch * (args.labeled_batch + args.unlabeled_batch)
  return Row(f'JAX epoch {dtype.replace("-", " ")}', images / seconds, seconds / steps_per_epoch,
             dtype, note=f'{steps_per_epoch} steps, epoch {seconds:.1f} s, compile '
             f'{compile_seconds:.0f} s')


# --- PyTorch ------------------------------------------------------------------------------------

def torch_rows(args, jax_backend: str) -> tuple[list[Row], str]:
  """`benchmarks.torch_throughput` in a process of its own: its rows and a header fragment.

  Its progress lines go straight to this process's stderr. A child that fails
  part-way still gives back the rows it finished.
  """
  kinds = [k for k in args.torch_rows.split(',') if k and (args.epoch or not k.startswith('epoch'))]
  if not kinds:
    return [], ''
  device = 'cuda' if args.torch_device == 'auto' and jax_backend == 'gpu' else args.torch_device
  forwarded = argparse.Namespace(**{**vars(args), 'torch_rows': ','.join(kinds), 'torch_device': device})
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'rows.json')
    sys.stdout.flush()
    sys.stderr.flush()
    returncode = subprocess.call(
        [sys.executable, '-m', 'benchmarks.torch_throughput', *common.forwarded_argv(forwarded),
         '--json', path], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if returncode:
      print(f'benchmarks.torch_throughput exited with code {returncode}', file=sys.stderr)
    if not os.path.exists(path):
      return [], ''
    with open(path) as f:
      report = json.load(f)
  return ([Row(**row) for row in report['rows']],
          f'PyTorch {report["torch_version"]} on {report["device"]} (CPU threads: {args.torch_threads})')


# --- Report -------------------------------------------------------------------------------------

def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or 'unknown'


def _number(value: float | None, scale: float = 1.0) -> str:
  return 'n/a' if value is None else f'{scale * value:.1f}'


def print_table(rows: list[Row], args, header: str, load: tuple[float, float]) -> None:
  """The table; `vs PyTorch` compares with the eager float32 PyTorch row of the same kind."""
  baseline = {kind: next((r for r in rows if r.name == f'PyTorch {kind} float32'
                          and r.images_per_second), None) for kind in ('step', 'epoch')}
  images_per_step = args.labeled_batch + args.unlabeled_batch
  print(f'\n{header}')
  print(f'{args.model}, width {args.width}, batch {args.labeled_batch}+{args.unlabeled_batch}, '
        f'{args.steps} timed steps after {args.warmup} warm-up, '
        f'{step_flops(args.width, images_per_step, args.model) / 1e9:.1f} GFLOP/step (analytic), '
        f'1-min load average {load[0]:.2f} before, {load[1]:.2f} after')
  print(f'{"":24} {"images/s":>10} {"ms/step":>10} {"vs PyTorch":>11} {"MFU":>7}  note')
  for row in rows:
    base = baseline['step' if ' step ' in row.name else 'epoch']
    ratio = (f'{row.images_per_second / base.images_per_second:.2f}x'
             if base and row.images_per_second else 'n/a')
    mfu = f'{100 * row.mfu:.1f}%' if row.mfu is not None else 'n/a'
    print(f'{row.name:24} {_number(row.images_per_second):>10} '
          f'{_number(row.seconds_per_step, 1e3):>10} {ratio:>11} {mfu:>7}  {row.note}')
  images_per_epoch = common.CIFAR10_UNLABELED // 128 * images_per_step
  print(f'\nProjected {REFERENCE_EPOCHS} CIFAR-10 epochs ({common.CIFAR10_UNLABELED // 128} steps '
        'each) at these rates:')
  for row in rows:
    if row.images_per_second:
      hours = REFERENCE_EPOCHS * images_per_epoch / row.images_per_second / 3600
      print(f'  {row.name:24} {hours:10.2f} h = {60 * hours:.0f} min')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  common.add_arguments(parser)
  parser.add_argument('--dtypes', default='float32,bfloat16', help='JAX compute dtypes')
  parser.add_argument('--skip_torch', action='store_true', help='no PyTorch rows')
  parser.add_argument('--epoch', action='store_true',
                      help='also time one end-to-end epoch (without it, no epoch rows of PyTorch either)')
  parser.add_argument('--epoch_dtypes', default='float32', help='JAX compute dtypes of the epoch rows')
  parser.add_argument('--steps_per_call', type=int, default=0,
                      help='JAX steps per jitted call (a lax.scan); 0: all timed steps (step rows), an epoch (epoch rows)')
  parser.add_argument('--profile', default='', metavar='DIR',
                      help='trace the first epoch row into DIR and print where its time goes')
  return parser.parse_args(argv)


def main(argv=None) -> list[Row]:
  args = parse_args(argv)
  jax_dtypes = {d.split('-')[0] for d in args.dtypes.split(',') + (
      args.epoch_dtypes.split(',') if args.epoch else []) if d}
  xla_cpu.configure('bfloat16' if jax_dtypes == {'bfloat16'} else 'float32')  # Before JAX starts.
  load_before = os.getloadavg()[0]
  backend = jax.default_backend()
  device_kind = jax.devices()[0].device_kind
  if backend == 'cpu':
    device_kind = f'CPU {_cpu_model()}, {os.cpu_count()} cores'
  measurements = [functools.partial(jax_step_row, args, d) for d in args.dtypes.split(',') if d]
  if args.epoch:
    data = common.synthetic_data(common.CIFAR10_LABELED, args.epoch_images)
    epoch_dtypes = [d for d in args.epoch_dtypes.split(',') if d]
    measurements += [functools.partial(jax_epoch_row, args, d, data,
                                       args.profile if i == 0 else '')
                     for i, d in enumerate(epoch_dtypes)]
  rows = []
  for measure in measurements:
    rows.append(measure())
    print(common.progress_line(rows[-1]), file=sys.stderr, flush=True)
  header = f'{datetime.date.today()}  {device_kind}  JAX {jax.__version__} ({backend})'
  if backend == 'cpu':
    header += f'  XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}'
  if not args.skip_torch:
    more_rows, torch_header = torch_rows(args, backend)
    rows += more_rows
    header += f'  {torch_header}' if torch_header else '  PyTorch rows missing'
  rows.sort(key=lambda row: ' epoch ' in row.name)  # Step rows first; JAX before PyTorch in each.
  if backend != 'cpu':
    flops = step_flops(args.width, args.labeled_batch + args.unlabeled_batch, args.model)
    for row in rows:
      peak = peak_tflops(device_kind, row.dtype)
      if peak and row.seconds_per_step:
        row.mfu = flops / row.seconds_per_step / (peak * 1e12)
  print_table(rows, args, header, (load_before, os.getloadavg()[0]))
  return rows


if __name__ == '__main__':
  main()
