"""Training throughput of the JAX step against the PyTorch port's eager step.

    python -m benchmarks.throughput --steps 20 --warmup 2 --epoch --epoch_dtypes float32,bfloat16

Rows (each at the full ConvLarge and a 32 + 128 batch unless flags say otherwise):

- JAX step, float32 and bfloat16 compute (`ConvLarge(dtype=...)`): `train_step`
  on one fixed batch already on the device. On an accelerator the timed steps
  run in one `lax.scan`; on the CPU every step is its own jitted call, because
  XLA:CPU runs these convolutions far slower inside a loop
  (`trainer.default_steps_per_call`).
- PyTorch step: `benchmarks.torch_reference.train_step`, eager float32, on
  fixed tensors on the device.
- With `--epoch`, one epoch end to end over synthetic uint8 CIFAR-size data,
  each side with its own data pipeline: JAX runs `trainer.run_steps`
  (sampling and augmentation inside `jit`); PyTorch crops and flips each image
  on the host with torch ops, as torchvision's transforms would, stacks the
  batch, moves it to the device and steps.

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
import dataclasses
import datetime
import functools
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from configs import default as default_config
from lcmt_jax import input_pipeline
from lcmt_jax import train_state
from lcmt_jax import trainer

CIFAR10_UNLABELED, CIFAR10_LABELED, REFERENCE_EPOCHS = 46_000, 4_000, 1000
# Dense peak TFLOP/s by device name: (bfloat16, TF32, float32 without tensor cores).
# First match wins, so a more specific name comes first.
PEAK_TFLOPS = (
    ('H100 PCIe', {'bfloat16': 756.0, 'tf32': 378.0, 'float32': 51.0}),
    ('H100', {'bfloat16': 989.0, 'tf32': 494.0, 'float32': 67.0}),  # SXM
    ('H200', {'bfloat16': 989.0, 'tf32': 494.0, 'float32': 67.0}),
)


def forward_flops(width: int, num_classes: int = 10, image_size: int = 32) -> int:
  """FLOPs (2 per multiply-accumulate) of one image's ConvLarge forward: convs and the dense layer."""
  w, s = width, image_size
  # (output height = width, kernel size, input channels, output channels), network order.
  layers = [(s, 3, 3, w), (s, 3, w, w), (s, 3, w, w),
            (s // 2, 3, w, 2 * w), (s // 2, 3, 2 * w, 2 * w), (s // 2, 3, 2 * w, 2 * w),
            (s // 4 - 2, 3, 2 * w, 4 * w), (s // 4 - 2, 1, 4 * w, 2 * w),
            (s // 4 - 2, 1, 2 * w, w), (1, 1, w, num_classes)]
  return 2 * sum(out * out * k * k * cin * cout for out, k, cin, cout in layers)


def step_flops(width: int, images_per_step: int) -> int:
  """Student forward + backward (3 forwards) and teacher forward (1) over every image."""
  return 4 * forward_flops(width) * images_per_step


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  for name, peaks in PEAK_TFLOPS:
    if name in device_kind:
      return peaks['bfloat16' if dtype == 'bfloat16' else 'tf32']
  return None


@dataclasses.dataclass
class Row:
  name: str
  images_per_second: float
  seconds_per_step: float
  mfu: float | None = None
  note: str = ''


# --- JAX ----------------------------------------------------------------------------------------

def _jax_setup(args, dtype: str, steps_per_epoch: int):
  config = default_config.get_config()
  config.update(width=args.width, labeled_batch_size=args.labeled_batch,
                unlabeled_batch_size=args.unlabeled_batch, compute_dtype=dtype)
  step_config = train_state.StepConfig.from_config(config, steps_per_epoch)
  model = trainer.build_model(config, num_classes=10)
  tx = train_state.make_optimizer(config, step_config)
  rng = np.random.default_rng(0)
  init_images = jnp.asarray(rng.normal(size=(args.labeled_batch, 32, 32, 3)), jnp.float32)
  # Every jitted call returns its state with this sharding, so the first timed call
  # sees the same input signature as the warm-up (no recompilation).
  state = jax.jit(functools.partial(train_state.create_train_state, model, tx,
                                    teacher_init='independent'),
                  out_shardings=_replicated())(jax.random.PRNGKey(0), init_images, init_images)
  return config, step_config, state


def _replicated() -> NamedSharding:
  return NamedSharding(trainer.make_mesh(), PartitionSpec())


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
  """`train_step` on one fixed device batch; a scan of all timed steps off the CPU."""
  _, step_config, state = _jax_setup(args, dtype, CIFAR10_UNLABELED // args.unlabeled_batch)
  rng = np.random.default_rng(1)
  images = lambda n: jnp.asarray(rng.normal(size=(n, 32, 32, 3)), jnp.float32)  # pylint: disable=unnecessary-lambda-assignment
  batch = {'labeled_student': images(args.labeled_batch), 'labeled_teacher': images(args.labeled_batch),
           'labels': jnp.asarray(rng.integers(0, 10, args.labeled_batch), jnp.int32),
           'unlabeled_student': images(args.unlabeled_batch),
           'unlabeled_teacher': images(args.unlabeled_batch)}
  steps_per_call = trainer.default_steps_per_call(args.steps)

  @functools.partial(jax.jit, donate_argnums=0, out_shardings=_replicated())
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
  return Row(f'JAX step {dtype}', (args.labeled_batch + args.unlabeled_batch) / seconds, seconds,
             note=f'compile + first call {compile_seconds:.0f} s')


def synthetic_data(num_labeled: int, num_unlabeled: int) -> dict[str, np.ndarray]:
  """Random uint8 CIFAR-size images and labels."""
  rng = np.random.default_rng(2)
  return {'labeled_images': rng.integers(0, 256, (num_labeled, 32, 32, 3), dtype=np.uint8),
          'labeled_labels': rng.integers(0, 10, num_labeled).astype(np.int32),
          'unlabeled_images': rng.integers(0, 256, (num_unlabeled, 32, 32, 3), dtype=np.uint8)}


def jax_epoch_row(args, dtype: str, data: dict[str, np.ndarray]) -> Row:
  """One epoch of `trainer.run_steps` over on-device data, compiled beforehand."""
  steps_per_epoch = len(data['unlabeled_images']) // args.unlabeled_batch
  _, step_config, state = _jax_setup(args, dtype, steps_per_epoch)
  mesh = trainer.make_mesh()
  device_data = jax.device_put(data, _replicated())
  run = jax.jit(functools.partial(
      trainer.run_steps, step_config=step_config, info=input_pipeline.DATASETS['cifar10'],
      labeled_batch_size=args.labeled_batch, unlabeled_batch_size=args.unlabeled_batch,
      batch_sharding=NamedSharding(mesh, PartitionSpec('data'))),
      static_argnames='num_steps', donate_argnums=0, out_shardings=_replicated())
  data_key = jax.random.PRNGKey(1)
  steps_per_call = trainer.default_steps_per_call(steps_per_epoch)
  calls = [min(steps_per_call, steps_per_epoch - s) for s in range(0, steps_per_epoch, steps_per_call)]
  for num_steps in sorted(set(calls)):  # Compiles every call shape outside the timing.
    state, _ = run(state, device_data, data_key, num_steps=num_steps)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for num_steps in calls:
    state, metrics = run(state, device_data, data_key, num_steps=num_steps)
    jax.device_get(metrics)  # As the trainer does after every call.
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  images = steps_per_epoch * (args.labeled_batch + args.unlabeled_batch)
  return Row(f'JAX epoch {dtype}', images / seconds, seconds / steps_per_epoch,
             note=f'{steps_per_epoch} steps, epoch {seconds:.1f} s')


# --- PyTorch ------------------------------------------------------------------------------------

def _torch_setup(args):
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_reference as ref  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(args.torch_threads)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.backends.cudnn.benchmark = True
  torch.manual_seed(0)
  student = ref.ConvLarge(width=args.width).to(device)
  teacher = ref.ConvLarge(width=args.width).to(device)
  init_images = torch.randn(args.labeled_batch, 3, 32, 32, device=device)
  ref.data_dependent_init(student, init_images)
  ref.data_dependent_init(teacher, init_images)
  hparams = ref.HParams()
  optimizer = ref.make_optimizer(student, hparams)
  step = lambda batch: ref.train_step(student, teacher, optimizer, batch, 1, hparams)  # pylint: disable=unnecessary-lambda-assignment
  return torch, device, step


def _torch_sync(torch, device):
  if device.type == 'cuda':
    torch.cuda.synchronize()


def torch_step_row(args) -> Row:
  torch, device, step = _torch_setup(args)
  images = lambda n: torch.randn(n, 3, 32, 32, device=device)  # pylint: disable=unnecessary-lambda-assignment
  batch = {'student_labeled': images(args.labeled_batch), 'teacher_labeled': images(args.labeled_batch),
           'labels': torch.randint(0, 10, (args.labeled_batch,), device=device),
           'student_unlabeled': images(args.unlabeled_batch),
           'teacher_unlabeled': images(args.unlabeled_batch)}
  for _ in range(args.warmup):
    step(batch)
  _torch_sync(torch, device)
  start = time.perf_counter()
  for _ in range(args.steps):
    step(batch)  # Returns Python floats (`.item()`), so each step ends synchronised.
  _torch_sync(torch, device)
  seconds = (time.perf_counter() - start) / args.steps
  return Row('PyTorch step float32', (args.labeled_batch + args.unlabeled_batch) / seconds, seconds)


class TorchAugmenter:
  """torchvision's RandomCrop(32, padding=2) + RandomHorizontalFlip + ToTensor + Normalize, per image."""

  def __init__(self, torch, info: input_pipeline.DatasetInfo):
    self.torch = torch
    self.mean = torch.tensor(info.mean).view(3, 1, 1)
    self.std = torch.tensor(info.std).view(3, 1, 1)
    self.flip = info.random_flip

  def __call__(self, image: np.ndarray):
    torch = self.torch
    x = torch.nn.functional.pad(torch.from_numpy(image).permute(2, 0, 1), (2, 2, 2, 2))
    top, left = torch.randint(0, 5, (2,)).tolist()
    x = x[:, top:top + 32, left:left + 32]
    if self.flip and torch.rand(()) < 0.5:
      x = x.flip(-1)
    return (x.float().div_(255) - self.mean) / self.std


def torch_epoch_row(args, data: dict[str, np.ndarray]) -> Row:
  """One epoch: shuffled loaders, two augmented views of every image on the host, then the step."""
  torch, device, step = _torch_setup(args)
  augment = TorchAugmenter(torch, input_pipeline.DATASETS['cifar10'])
  labeled, labels, unlabeled = (data['labeled_images'], data['labeled_labels'],
                                data['unlabeled_images'])
  steps_per_epoch = len(unlabeled) // args.unlabeled_batch
  labeled_steps = len(labeled) // args.labeled_batch

  def views(images, indices):
    return [torch.stack([augment(images[i]) for i in indices]).to(device) for _ in range(2)]

  def run_epoch(num_steps):
    unlabeled_order = torch.randperm(len(unlabeled)).numpy()
    for i in range(num_steps):
      if i % labeled_steps == 0:  # The labelled loader restarts, reshuffled.
        labeled_order = torch.randperm(len(labeled)).numpy()
      li = labeled_order[(i % labeled_steps) * args.labeled_batch:][:args.labeled_batch]
      ui = unlabeled_order[i * args.unlabeled_batch:(i + 1) * args.unlabeled_batch]
      student_l, teacher_l = views(labeled, li)
      student_u, teacher_u = views(unlabeled, ui)
      step({'student_labeled': student_l, 'teacher_labeled': teacher_l,
            'labels': torch.as_tensor(labels[li]).long().to(device),
            'student_unlabeled': student_u, 'teacher_unlabeled': teacher_u})

  run_epoch(min(args.warmup, steps_per_epoch))
  _torch_sync(torch, device)
  start = time.perf_counter()
  run_epoch(steps_per_epoch)
  _torch_sync(torch, device)
  seconds = time.perf_counter() - start
  images = steps_per_epoch * (args.labeled_batch + args.unlabeled_batch)
  return Row('PyTorch epoch float32', images / seconds, seconds / steps_per_epoch,
             note=f'{steps_per_epoch} steps, epoch {seconds:.1f} s')


# --- Report -------------------------------------------------------------------------------------

def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or 'unknown'


def print_table(rows: list[Row], args, device_kind: str, load: tuple[float, float]) -> None:
  baseline = {kind: next((r for r in rows if r.name.startswith(f'PyTorch {kind}')), None)
              for kind in ('step', 'epoch')}
  images_per_step = args.labeled_batch + args.unlabeled_batch
  print(f'\n{datetime.date.today()}  {device_kind}  JAX {jax.__version__} ({jax.default_backend()})'
        + ('' if args.skip_torch else f'  PyTorch {_torch_version()} (CPU threads: {args.torch_threads})'))
  print(f'width {args.width}, batch {args.labeled_batch}+{args.unlabeled_batch}, '
        f'{args.steps} timed steps after {args.warmup} warm-up, '
        f'{step_flops(args.width, images_per_step) / 1e9:.0f} GFLOP/step (analytic), '
        f'1-min load average {load[0]:.2f} before, {load[1]:.2f} after')
  print(f'{"":24} {"images/s":>10} {"ms/step":>10} {"vs PyTorch":>11} {"MFU":>7}  note')
  for row in rows:
    base = baseline['step' if ' step ' in row.name else 'epoch']
    ratio = f'{row.images_per_second / base.images_per_second:.2f}x' if base else 'n/a'
    mfu = f'{100 * row.mfu:.1f}%' if row.mfu is not None else 'n/a'
    print(f'{row.name:24} {row.images_per_second:10.1f} {1e3 * row.seconds_per_step:10.1f} '
          f'{ratio:>11} {mfu:>7}  {row.note}')
  images_per_epoch = CIFAR10_UNLABELED // 128 * images_per_step
  print(f'\nProjected {REFERENCE_EPOCHS} CIFAR-10 epochs ({CIFAR10_UNLABELED // 128} steps each) '
        'at these rates:')
  for row in rows:
    hours = REFERENCE_EPOCHS * images_per_epoch / row.images_per_second / 3600
    print(f'  {row.name:24} {hours:10.2f} h = {60 * hours:.0f} min')


def _torch_version() -> str:
  import torch  # pylint: disable=import-outside-toplevel
  return torch.__version__


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--width', type=int, default=128)
  parser.add_argument('--labeled_batch', type=int, default=32)
  parser.add_argument('--unlabeled_batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=20, help='timed steps per step row')
  parser.add_argument('--warmup', type=int, default=2,
                      help='untimed steps after compilation (rounded up to whole calls)')
  parser.add_argument('--dtypes', default='float32,bfloat16', help='JAX compute dtypes')
  parser.add_argument('--skip_torch', action='store_true')
  parser.add_argument('--torch_threads', type=int, default=os.cpu_count(),
                      help='intra-op threads of PyTorch on the CPU (default: every core)')
  parser.add_argument('--epoch', action='store_true', help='also time one end-to-end epoch')
  parser.add_argument('--epoch_dtypes', default='float32', help='JAX compute dtypes of the epoch rows')
  parser.add_argument('--epoch_images', type=int, default=CIFAR10_UNLABELED,
                      help='unlabelled images in the synthetic epoch (46,000 = CIFAR-10)')
  return parser.parse_args(argv)


def main(argv=None) -> list[Row]:
  args = parse_args(argv)
  load_before = os.getloadavg()[0]
  device_kind = jax.devices()[0].device_kind
  if jax.default_backend() == 'cpu':
    device_kind = f'CPU {_cpu_model()}, {os.cpu_count()} cores'
  measurements = [functools.partial(jax_step_row, args, d) for d in args.dtypes.split(',') if d]
  if not args.skip_torch:
    measurements.append(functools.partial(torch_step_row, args))
  if args.epoch:
    data = synthetic_data(CIFAR10_LABELED, args.epoch_images)
    measurements += [functools.partial(jax_epoch_row, args, d, data)
                     for d in args.epoch_dtypes.split(',') if d]
    if not args.skip_torch:
      measurements.append(functools.partial(torch_epoch_row, args, data))
  rows = []
  for measure in measurements:
    rows.append(measure())
    print(f'{rows[-1].name}: {1e3 * rows[-1].seconds_per_step:.1f} ms/step', file=sys.stderr,
          flush=True)
  if jax.default_backend() != 'cpu':
    flops = step_flops(args.width, args.labeled_batch + args.unlabeled_batch)
    for row in rows:
      dtype = 'bfloat16' if 'bfloat16' in row.name else 'float32'
      peak = peak_tflops(device_kind, dtype)
      if peak:
        row.mfu = flops / row.seconds_per_step / (peak * 1e12)
  print_table(rows, args, device_kind, (load_before, os.getloadavg()[0]))
  return rows


if __name__ == '__main__':
  main()
