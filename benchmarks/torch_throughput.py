"""PyTorch rows of the throughput benchmark, in a process that never imports JAX.

`python -m benchmarks.throughput` runs this module as a subprocess and merges
its rows into one table; on its own,

    python -m benchmarks.torch_throughput --torch_rows eager,bf16 --json rows.json

prints each row to stderr as it finishes and writes them all to `--json`.

Rows (`--torch_rows`), each at the full ConvLarge (`--model wrn28_2`: WRN-28-2, the port of
`lcmt_jax.models.WideResNet`) and a 32 + 128 batch unless
flags say otherwise; every step is `torch_reference.train_step`, which reads
its losses with `.item()` and so ends each step with a host sync, as the
reference does:

- `eager`: `PyTorch step float32`, eager, on one fixed batch on the device;
  the baseline of the `vs PyTorch` column.
- `bf16`: `PyTorch step bf16+CL`, the same under `torch.autocast(bfloat16)`
  with models and images in `torch.channels_last`.
- `compiled`: `PyTorch step compiled`, the bf16+CL step with student and
  teacher wrapped in `torch.compile` (default mode, static shapes). It runs in
  a spawned process of its own, killed with its compile workers if compiling
  and warming up outlast `--torch_compile_budget`; the row then has no numbers.
- `epoch`: `PyTorch epoch float32`, one epoch over synthetic uint8 data, each
  image cropped and flipped with torch ops in this process, then the step;
  the epoch baseline.
- `epoch_reference`: `PyTorch epoch reference`, the reference's own feeding:
  `DataLoader`s (labelled batch 32, unlabelled 128, shuffled, last partial
  batch dropped, `--torch_workers` workers, pinned memory on CUDA) over a
  dataset that applies torchvision's RandomCrop(32, padding=2),
  RandomHorizontalFlip, ToTensor and Normalize twice to each image (student and
  teacher views); the same crop and flip in torch ops where torchvision is
  missing. The labelled iterator restarts at the top of the epoch and whenever
  it runs out. Float32 eager step.
- `epoch_bf16`: `PyTorch epoch bf16+CL`, that feeding with the bf16+CL step.

An epoch row times one whole epoch after `--warmup` untimed steps; creating the
epoch's iterators, and so starting the DataLoader workers, is inside the
timing, as it is in every epoch of a real run.
"""

import argparse
import dataclasses
import functools
import itertools
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback
import typing
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from benchmarks import common
from lcmt_jax.testing import torch_reference as ref


class Kind(typing.NamedTuple):
  """What sets one PyTorch row apart."""
  name: str
  mixed: bool  # Autocast to bfloat16, models and images in channels_last.
  compiled: bool
  loader: str | None  # None: a step row; 'host' or 'workers': how an epoch row is fed.


KINDS = {
    'eager': Kind('PyTorch step float32', False, False, None),
    'bf16': Kind('PyTorch step bf16+CL', True, False, None),
    'compiled': Kind('PyTorch step compiled', True, True, None),
    'epoch': Kind('PyTorch epoch float32', False, False, 'host'),
    'epoch_reference': Kind('PyTorch epoch reference', False, False, 'workers'),
    'epoch_bf16': Kind('PyTorch epoch bf16+CL', True, False, 'workers'),
}


@dataclasses.dataclass
class Setup:
  """A row's models behind `step(batch)`, and where and in which layout its batches go."""
  device: torch.device
  memory_format: torch.memory_format
  step: Callable[[dict], dict]


def _configure(args) -> None:
  torch.set_num_threads(args.torch_threads)
  torch.backends.cudnn.benchmark = True


def _device(args) -> torch.device:
  if args.torch_device == 'auto':
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  return torch.device(args.torch_device)


def _setup(args, kind: Kind) -> Setup:
  """Student, teacher and optimiser as the reference builds them, in the row's precision and layout."""
  device = _device(args)
  memory_format = torch.channels_last if kind.mixed else torch.contiguous_format
  torch.manual_seed(0)
  network = ref.WideResNet if args.model == 'wrn28_2' else ref.ConvLarge
  student, teacher = (network(width=args.width).to(device, memory_format=memory_format)
                      for _ in range(2))
  if network is ref.ConvLarge:  # WRN starts from its random initialisation.
    init_images = torch.randn(args.labeled_batch, 3, 32, 32, device=device)
    ref.data_dependent_init(student, init_images.contiguous(memory_format=memory_format))
    ref.data_dependent_init(teacher, init_images.contiguous(memory_format=memory_format))
  hparams = ref.HParams()
  optimizer = ref.make_optimizer(student, hparams)
  if kind.compiled:
    # Static shapes: one graph per batch size (32, 128), as a fixed-batch run wants.
    student, teacher = torch.compile(student, dynamic=False), torch.compile(teacher, dynamic=False)
  autocast_dtype = torch.bfloat16 if kind.mixed else None
  step = lambda batch: ref.train_step(student, teacher, optimizer, batch, 1, hparams, autocast_dtype)  # pylint: disable=unnecessary-lambda-assignment
  return Setup(device, memory_format, step)


def _place(setup: Setup, student_labeled, teacher_labeled, labels, student_unlabeled,
           teacher_unlabeled) -> dict[str, torch.Tensor]:
  """A `train_step` batch on the row's device and in its memory format."""
  images = lambda x: x.to(setup.device, non_blocking=True, memory_format=setup.memory_format)  # pylint: disable=unnecessary-lambda-assignment
  return {'student_labeled': images(student_labeled), 'teacher_labeled': images(teacher_labeled),
          'labels': labels.long().to(setup.device, non_blocking=True),
          'student_unlabeled': images(student_unlabeled),
          'teacher_unlabeled': images(teacher_unlabeled)}


def _run(setup: Setup, batches: Iterable[dict]) -> tuple[int, float]:
  """Steps through `batches`; returns the step count and the seconds, device-synchronised."""
  sync = torch.cuda.synchronize if setup.device.type == 'cuda' else lambda: None
  sync()
  start = time.perf_counter()
  steps = 0
  for batch in batches:
    setup.step(batch)
    steps += 1
  sync()
  return steps, time.perf_counter() - start


def _dtype(kind: Kind) -> str:
  return 'bfloat16' if kind.mixed else 'float32'


def _row(args, kind: Kind, steps: int, seconds: float, note: str = '') -> common.Row:
  per_step = seconds / steps
  return common.Row(kind.name, (args.labeled_batch + args.unlabeled_batch) / per_step, per_step,
                    _dtype(kind), note=note)


def _unmeasured(kind: Kind, note: str) -> common.Row:
  return common.Row(kind.name, None, None, _dtype(kind), note=note)


def step_row(args, kind: Kind, warmed_up: Callable[[], None] = lambda: None) -> common.Row:
  """`train_step` on one fixed batch on the device; `warmed_up` is called before the timing."""
  setup = _setup(args, kind)
  images = lambda n: torch.randn(n, 3, 32, 32)  # pylint: disable=unnecessary-lambda-assignment
  batch = _place(setup, images(args.labeled_batch), images(args.labeled_batch),
                 torch.randint(0, 10, (args.labeled_batch,)), images(args.unlabeled_batch),
                 images(args.unlabeled_batch))
  _, first_seconds = _run(setup, [batch])  # Compiles, for the compiled row.
  _run(setup, itertools.repeat(batch, args.warmup))
  warmed_up()
  steps, seconds = _run(setup, itertools.repeat(batch, args.steps))
  return _row(args, kind, steps, seconds,
              f'compile + first call {first_seconds:.0f} s' if kind.compiled else '')


# --- The compiled row, in a process of its own -----------------------------------------------------

def _compiled_worker(args, conn) -> None:
  """Sends ('ready',) after the warm-up, then ('row', row); or ('error', exception type)."""
  os.setpgrp()  # Its own process group, so that killing it also ends inductor's compile workers.
  _configure(args)
  try:
    row = step_row(args, KINDS['compiled'], warmed_up=lambda: conn.send(('ready',)))
    conn.send(('row', row))
  except Exception as e:  # pylint: disable=broad-exception-caught
    traceback.print_exc()
    conn.send(('error', type(e).__name__))


def _receive(conn, process, seconds: float) -> tuple | None:
  """The worker's next message; None if it sends none within `seconds` or ends first."""
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline and process.is_alive() and not conn.poll(1.0):
    pass
  try:
    return conn.recv() if conn.poll() else None
  except EOFError:
    return None


def _end(process) -> None:
  """Kills the worker's process group, if still there, and reaps the worker."""
  if process.is_alive():
    try:
      os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # Killed before its `setpgrp`.
      process.kill()
  process.join()


def compiled_step_row(args, kind: Kind) -> common.Row:
  """`step_row` of the compiled kind in a spawned process, dropped if it outlasts the budget."""
  if torch.cuda.is_initialized():
    torch.cuda.empty_cache()  # The worker shares what GPU memory JAX's process left.
  context = multiprocessing.get_context('spawn')  # CUDA is not safe to fork.
  receiver, sender = context.Pipe(duplex=False)
  process = context.Process(target=_compiled_worker, args=(args, sender))
  process.start()
  sender.close()
  try:
    message = _receive(receiver, process, args.torch_compile_budget)
    out_of_time = message is None and process.is_alive()
    if message and message[0] == 'ready':
      message = _receive(receiver, process, math.inf)
    if not out_of_time:
      process.join(60)  # Lets it exit cleanly: a kill would leak inductor's semaphores.
  finally:
    _end(process)
  if out_of_time:
    return _unmeasured(kind, f'did not compile within {args.torch_compile_budget:.0f} s')
  if message is None:
    return _unmeasured(kind, f'compile process exited with code {process.exitcode}')
  if message[0] == 'error':
    return _unmeasured(kind, f'torch.compile step raised {message[1]}')
  return message[1]


# --- Epoch rows ------------------------------------------------------------------------------------

class TorchAugmenter:
  """torchvision's RandomCrop(32, padding=2) + RandomHorizontalFlip + ToTensor + Normalize, in torch ops.

  Takes one uint8 HWC NumPy image, as the reference's dataset holds them.
  """

  def __init__(self, mean: tuple[float, ...] = common.CIFAR10_MEAN,
               std: tuple[float, ...] = common.CIFAR10_STD, flip: bool = True):
    self.mean = torch.tensor(mean).view(3, 1, 1)
    self.std = torch.tensor(std).view(3, 1, 1)
    self.flip = flip

  def __call__(self, image: np.ndarray) -> torch.Tensor:
    x = torch.nn.functional.pad(torch.from_numpy(image).permute(2, 0, 1), (2, 2, 2, 2))
    top, left = torch.randint(0, 5, (2,)).tolist()
    x = x[:, top:top + 32, left:left + 32]
    if self.flip and torch.rand(()) < 0.5:
      x = x.flip(-1)
    return (x.float().div_(255) - self.mean) / self.std


def _host_batches(args, setup: Setup, data: dict[str, np.ndarray]) -> Iterator[dict]:
  """One epoch augmented image by image in this process, between the steps."""
  augment = TorchAugmenter()
  labeled, labels, unlabeled = (data['labeled_images'], torch.as_tensor(data['labeled_labels']),
                                data['unlabeled_images'])
  labeled_steps = len(labeled) // args.labeled_batch
  views = lambda images, indices: [torch.stack([augment(images[i]) for i in indices])  # pylint: disable=unnecessary-lambda-assignment
                                   for _ in range(2)]
  unlabeled_order = torch.randperm(len(unlabeled)).numpy()
  for i in range(len(unlabeled) // args.unlabeled_batch):
    if i % labeled_steps == 0:  # The labelled loader restarts, reshuffled.
      labeled_order = torch.randperm(len(labeled)).numpy()
    li = labeled_order[(i % labeled_steps) * args.labeled_batch:][:args.labeled_batch]
    ui = unlabeled_order[i * args.unlabeled_batch:(i + 1) * args.unlabeled_batch]
    yield _place(setup, *views(labeled, li), labels[li], *views(unlabeled, ui))


class TwoViews(torch.utils.data.Dataset):
  """Each uint8 HWC image transformed twice, independently (student and teacher view), and its label."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
    self.images, self.labels, self.transform = images, labels, transform

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int):
    return self.transform(self.images[i]), self.transform(self.images[i]), int(self.labels[i])


def reference_transform() -> tuple[Callable, str]:
  """The reference's training transform and a note on which implementation it is."""
  try:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from torchvision import transforms  # pylint: disable=import-outside-toplevel
  except ImportError:
    return TorchAugmenter(), 'torch-op transforms, no torchvision'
  return transforms.Compose([
      Image.fromarray, transforms.RandomCrop(32, padding=2), transforms.RandomHorizontalFlip(),
      transforms.ToTensor(), transforms.Normalize(common.CIFAR10_MEAN, common.CIFAR10_STD)
  ]), 'torchvision transforms'


def _worker_batches(setup: Setup, labeled_loader, unlabeled_loader) -> Iterator[dict]:
  """One epoch as the reference draws it: new iterators, the labelled one renewed when it runs out."""
  labeled = iter(labeled_loader)
  for student_u, teacher_u, _ in unlabeled_loader:
    batch = next(labeled, None)
    if batch is None:
      labeled = iter(labeled_loader)
      batch = next(labeled)
    yield _place(setup, *batch, student_u, teacher_u)


def epoch_row(args, kind: Kind, data: dict[str, np.ndarray]) -> common.Row:
  """One timed epoch after `--warmup` untimed steps, fed as `kind.loader` says."""
  setup = _setup(args, kind)
  if kind.loader == 'host':
    batches = functools.partial(_host_batches, args, setup, data)
    feeding = 'host augmentation between steps'
  else:
    transform, feeding = reference_transform()
    loader = functools.partial(torch.utils.data.DataLoader, shuffle=True, drop_last=True,
                               num_workers=args.torch_workers,
                               pin_memory=setup.device.type == 'cuda')
    labeled = loader(TwoViews(data['labeled_images'], data['labeled_labels'], transform),
                     batch_size=args.labeled_batch)
    unlabeled = loader(TwoViews(data['unlabeled_images'], np.full(len(data['unlabeled_images']), -1),
                                transform), batch_size=args.unlabeled_batch)
    batches = functools.partial(_worker_batches, setup, labeled, unlabeled)
    feeding = f'{args.torch_workers} DataLoader workers, {feeding}'
  _run(setup, itertools.islice(batches(), args.warmup))
  steps, seconds = _run(setup, batches())
  return _row(args, kind, steps, seconds, f'{steps} steps, epoch {seconds:.1f} s; {feeding}')


# --- Main ------------------------------------------------------------------------------------------

def measure(args, kind_name: str, data: dict[str, np.ndarray] | None) -> common.Row:
  """One row; a row that raises comes back without numbers, the exception type in its note."""
  kind = KINDS[kind_name]
  try:
    if kind.loader:
      return epoch_row(args, kind, data)
    return (compiled_step_row if kind.compiled else step_row)(args, kind)
  except Exception as e:  # pylint: disable=broad-exception-caught
    traceback.print_exc()
    return _unmeasured(kind, f'raised {type(e).__name__}')


def _device_name(args) -> str:
  device = _device(args)
  if device.type == 'cuda' and not torch.cuda.is_available():  # Fails now, not in every row.
    raise SystemExit(f'PyTorch {torch.__version__} sees no CUDA device')
  return torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  common.add_arguments(parser)
  parser.add_argument('--json', help='file to write the rows to, rewritten as each row finishes')
  return parser.parse_args(argv)


def main(argv=None) -> list[common.Row]:
  args = parse_args(argv)
  _configure(args)
  kinds = [k for k in args.torch_rows.split(',') if k]
  data = (common.synthetic_data(common.CIFAR10_LABELED, args.epoch_images)
          if any(KINDS[k].loader for k in kinds) else None)
  report = {'torch_version': torch.__version__, 'device': _device_name(args), 'rows': []}
  rows = []
  for kind_name in kinds:
    rows.append(measure(args, kind_name, data))
    print(common.progress_line(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
      report['rows'] = [dataclasses.asdict(row) for row in rows]
      with open(args.json, 'w') as f:
        json.dump(report, f)
  return rows


if __name__ == '__main__':
  main()
