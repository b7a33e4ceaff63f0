"""What the JAX and the PyTorch processes of the throughput benchmark share.

Nothing here imports JAX or PyTorch: `benchmarks.throughput` (JAX) and
`benchmarks.torch_throughput` (PyTorch, run as a subprocess of the former)
both import it, and neither framework may load in the other's process.
"""

import argparse
import dataclasses
import os

import numpy as np

CIFAR10_UNLABELED, CIFAR10_LABELED = 46_000, 4_000
# docs/reference.md "Data"; the same as `input_pipeline.DATASETS['cifar10']`, which imports JAX.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TORCH_ROWS = ('eager', 'bf16', 'compiled', 'epoch', 'epoch_reference', 'epoch_bf16')


@dataclasses.dataclass
class Row:
  """One line of the table; a row that could not be measured has no numbers, only its note."""
  name: str
  images_per_second: float | None
  seconds_per_step: float | None
  dtype: str = 'float32'  # Compute dtype: picks the peak that MFU is rated against.
  mfu: float | None = None
  note: str = ''


def progress_line(row: Row) -> str:
  """The line each process prints to stderr as a row finishes, so a timeout keeps it."""
  if row.seconds_per_step is None:
    return f'{row.name}: {row.note}'
  return (f'{row.name}: {row.images_per_second:.1f} images/s, '
          f'{1e3 * row.seconds_per_step:.1f} ms/step  {row.note}')


def synthetic_data(num_labeled: int, num_unlabeled: int) -> dict[str, np.ndarray]:
  """Random uint8 CIFAR-size images and labels, the same in every process."""
  rng = np.random.default_rng(2)
  return {'labeled_images': rng.integers(0, 256, (num_labeled, 32, 32, 3), dtype=np.uint8),
          'labeled_labels': rng.integers(0, 10, num_labeled).astype(np.int32),
          'unlabeled_images': rng.integers(0, 256, (num_unlabeled, 32, 32, 3), dtype=np.uint8)}


def _torch_row_kinds(text: str) -> str:
  unknown = set(text.split(',')) - set(TORCH_ROWS) - {''}
  if unknown:
    raise argparse.ArgumentTypeError(
        f'unknown PyTorch rows {sorted(unknown)}; choose from {",".join(TORCH_ROWS)}')
  return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags of both processes; `forwarded_argv` passes them on to the PyTorch one."""
  parser.add_argument('--model', choices=('convlarge', 'wrn28_2'), default='convlarge',
                      help='the network (wrn28_2: WRN-28-2 under configs/cifar10_wrn.py)')
  parser.add_argument('--width', type=int, default=128)
  parser.add_argument('--labeled_batch', type=int, default=32)
  parser.add_argument('--unlabeled_batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=20, help='timed steps per step row')
  parser.add_argument('--warmup', type=int, default=2,
                      help='untimed steps after compilation (JAX: rounded up to whole calls)')
  parser.add_argument('--epoch_images', type=int, default=CIFAR10_UNLABELED,
                      help='unlabelled images in the synthetic epoch (46,000 = CIFAR-10)')
  parser.add_argument('--torch_rows', type=_torch_row_kinds, default=','.join(TORCH_ROWS),
                      help='PyTorch rows to measure, comma-separated from ' + ','.join(TORCH_ROWS))
  parser.add_argument('--torch_device', choices=('auto', 'cuda', 'cpu'), default='auto',
                      help='device of the PyTorch rows (auto: CUDA if PyTorch sees one)')
  parser.add_argument('--torch_threads', type=int, default=os.cpu_count(),
                      help='intra-op threads of PyTorch on the CPU (default: every core)')
  parser.add_argument('--torch_workers', type=int, default=4,
                      help='DataLoader worker processes of the reference-style epoch rows')
  parser.add_argument('--torch_compile_budget', type=float, default=240.0,
                      help='seconds torch.compile may take (with the warm-up) before its row is dropped')


def forwarded_argv(args: argparse.Namespace) -> list[str]:
  """The `add_arguments` flags of `args` as a command line."""
  parser = argparse.ArgumentParser()
  add_arguments(parser)
  return [item for name in vars(parser.parse_args([]))
          for item in (f'--{name}', str(getattr(args, name)))]
