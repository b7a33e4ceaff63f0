"""Where a CPU training step spends its time, by op class, for JAX and for the PyTorch port.

    python -m benchmarks.cpu_profile --width 32 --steps 3 [--framework both|jax|torch]
        [--dtype float32|bfloat16]

JAX: `train_state.train_step` on one fixed batch (as the `JAX step` row of
`benchmarks.throughput` runs it, one jitted call per step), timed untraced,
then `--steps` steps under `jax.profiler.trace`; the trace and the call's
optimised HLO are read by `benchmarks.profile_summary`, which attributes every
XLA:CPU thunk to an op class (convolution forward, input gradient and kernel
gradient, weight norm, mean-only batch norm, leaky ReLU, max-pool, dropout,
...). Its `wall` column splits each moment of the step among the thunks
running then, so it adds up to the step's wall time.

PyTorch: `torch_reference.train_step` with the same models and batch under
`torch.profiler`; every op's self time goes to the op class of the innermost
range around it that names one: the autograd node that runs it in the
backward pass (`ConvolutionBackward0`, ...), the teacher's forward, the weight
norm (`effective_weight`), or the op itself. PyTorch's intra-op threads run
inside an op, so self times add up to the wall time of the step.

`--dtype bfloat16` profiles the bfloat16 steps: JAX's with
`compute_dtype='bfloat16'` (and the oneDNN flag `train.py` sets for it),
PyTorch's under `torch.autocast(bfloat16)` with models and images in
`channels_last` (the `bf16+CL` row of `benchmarks.throughput`).

Each framework runs in a process of its own, JAX first. The JAX one calls
`lcmt_jax.xla_cpu.configure` first, as `train.py` does (`LCMT_XLA_CPU_FLAGS=0`
leaves XLA's defaults); its header prints the `XLA_FLAGS` it ran with.
The 1-minute load average is printed next to each table.
"""

import argparse
import collections
import functools
import os
import subprocess
import sys
import time


def _args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--width', type=int, default=32)
  parser.add_argument('--labeled_batch', type=int, default=32)
  parser.add_argument('--unlabeled_batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--framework', choices=('both', 'jax', 'torch'), default='both')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='compute type of both steps')
  parser.add_argument('--dir', default='/tmp/lcmt_cpu_profile', help='where the JAX trace goes')
  parser.add_argument('--torch_threads', type=int, default=os.cpu_count())
  parser.add_argument('--top', type=int, default=0, help='also list the N costliest instructions')
  return parser.parse_args(argv)


def _print_table(title: str, by_class: dict, steps: int, total_wall_s: float) -> None:
  total = sum(by_class.values())
  sys.stdout.flush()
  print(title)
  for name, seconds in sorted(by_class.items(), key=lambda kv: -kv[1]):
    print(f'  {name:36} {1e3 * seconds / steps:10.1f} ms/step {100 * seconds / total:5.1f}%')
  print(f'  {"total":36} {1e3 * total / steps:10.1f} ms/step (untraced step: '
        f'{1e3 * total_wall_s:.1f} ms)')


# --- JAX ----------------------------------------------------------------------------------------

def run_jax(args) -> None:
  from lcmt_jax import xla_cpu  # pylint: disable=import-outside-toplevel
  xla_cpu.configure(args.dtype)  # Before JAX starts.
  import glob  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import profile_summary  # pylint: disable=import-outside-toplevel
  from benchmarks import throughput  # pylint: disable=import-outside-toplevel
  from lcmt_jax import train_state  # pylint: disable=import-outside-toplevel

  bench_args = throughput.parse_args(['--width', str(args.width), '--labeled_batch',
                                      str(args.labeled_batch), '--unlabeled_batch',
                                      str(args.unlabeled_batch)])
  _, step_config, state = throughput.jax_setup(bench_args, args.dtype,
                                               46_000 // args.unlabeled_batch)
  batch = throughput.random_step_batch(bench_args)
  step = jax.jit(lambda s, b: train_state.train_step(s, b, step_config)[0], donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  os.makedirs(args.dir, exist_ok=True)
  for old in glob.glob(os.path.join(args.dir, 'plugins', '**', '*'), recursive=True):
    if os.path.isfile(old):
      os.remove(old)
  with open(os.path.join(args.dir, 'hlo.txt'), 'w') as f:
    f.write(compiled.as_text())
  state = jax.block_until_ready(compiled(state, batch))
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state = jax.block_until_ready(compiled(state, batch))
    times.append(time.perf_counter() - start)
  load = os.getloadavg()[0]
  with jax.profiler.trace(args.dir, create_perfetto_trace=True):
    for _ in range(args.steps):
      state = compiled(state, batch)
    jax.block_until_ready(state)
  print(f'JAX {jax.__version__}, {args.dtype}, width {args.width}, batch {args.labeled_batch}+'
        f'{args.unlabeled_batch}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; untraced step '
        f'min {1e3 * min(times):.1f} ms, median {1e3 * sorted(times)[len(times) // 2]:.1f} ms; '
        f'1-min load average {load:.2f}')
  print(profile_summary.summarize(args.dir, args.steps, top=args.top))


# --- PyTorch ------------------------------------------------------------------------------------

# Backward: the autograd node that runs an op, by op class (first match).
_TORCH_BACKWARD = (('ConvolutionBackward', 'conv input + kernel grad'),
                   ('MaxPool2DWithIndicesBackward', 'max-pool + grad'),
                   ('LeakyReluBackward', 'leaky ReLU'), ('DropoutBackward', 'dropout + random bits'),
                   ('MeanBackward', 'batch norm (mean-only)'),
                   ('SubBackward', 'batch norm (mean-only)'),
                   ('AddBackward', 'batch norm (mean-only)'),
                   ('MmBackward', 'dense + pairwise matmuls'),
                   ('AddmmBackward', 'dense + pairwise matmuls'))
# Forward: the op or the range around it (innermost first), by op class (first match).
_TORCH_FORWARD = (('convolution', 'conv forward'), ('max_pool2d', 'max-pool + grad'),
                  ('leaky_relu', 'leaky ReLU'), ('dropout', 'dropout + random bits'),
                  ('bernoulli', 'dropout + random bits'), ('aten::mm', 'dense + pairwise matmuls'),
                  ('aten::addmm', 'dense + pairwise matmuls'),
                  ('aten::linear', 'dense + pairwise matmuls'),
                  ('local_clustering', 'pairwise kernel (local clustering)'),
                  ('weight_norm', 'weight norm'), ('optimizer', 'optimiser + EMA'),
                  ('ema_update', 'optimiser + EMA'), ('batch_norm', 'batch norm (mean-only)'))


def _torch_class(names: list[str]) -> str:
  """`names`: the op and its enclosing ranges, innermost first."""
  for name in names:
    if 'evaluate_function:' in name:
      node = name.rsplit(':', 1)[-1]
      for key, op_class in _TORCH_BACKWARD:
        if key in node:
          return op_class
      # The weight norm's and the losses' own small backward nodes.
      return 'other backward'
  for name in names:
    for key, op_class in _TORCH_FORWARD:
      if key in name:
        if op_class == 'conv forward':
          return 'conv forward (teacher)' if 'teacher_forward' in names else 'conv forward (student)'
        return op_class
  return 'other'


def run_torch(args) -> None:
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from torch.profiler import ProfilerActivity, profile, record_function  # pylint: disable=import-outside-toplevel
  from lcmt_jax.testing import torch_reference as ref  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(args.torch_threads)
  torch.manual_seed(0)
  mixed = args.dtype == 'bfloat16'
  memory_format = torch.channels_last if mixed else torch.contiguous_format
  student, teacher = (ref.ConvLarge(width=args.width).to(memory_format=memory_format)
                      for _ in range(2))
  init_images = torch.randn(args.labeled_batch, 3, 32, 32).contiguous(memory_format=memory_format)
  ref.data_dependent_init(student, init_images)
  ref.data_dependent_init(teacher, init_images)
  hparams = ref.HParams()
  optimizer = ref.make_optimizer(student, hparams)

  def labelled(fn, label):
    @functools.wraps(fn)
    def wrapper(*a, **k):
      with record_function(label):
        return fn(*a, **k)
    return wrapper

  # Ranges that name the parts the ops alone do not (no file of the port changes).
  teacher.forward = labelled(teacher.forward, 'teacher_forward')
  ref.WeightNormMeanOnlyBN.effective_weight = labelled(ref.WeightNormMeanOnlyBN.effective_weight,
                                                      'weight_norm')
  ref.local_clustering_loss = labelled(ref.local_clustering_loss, 'local_clustering')
  optimizer.step = labelled(optimizer.step, 'optimizer')
  ref.update_teacher = labelled(ref.update_teacher, 'ema_update')
  original_layer_forward = ref.WeightNormMeanOnlyBN.forward

  def layer_forward(self, x):
    with record_function('batch_norm'):
      return original_layer_forward(self, x)
  ref.WeightNormMeanOnlyBN.forward = layer_forward

  rng = np.random.default_rng(1)
  images = lambda n: torch.as_tensor(rng.normal(size=(n, 3, 32, 32)), dtype=torch.float32).contiguous(  # pylint: disable=unnecessary-lambda-assignment
      memory_format=memory_format)
  batch = {'student_labeled': images(args.labeled_batch),
           'teacher_labeled': images(args.labeled_batch),
           'labels': torch.as_tensor(rng.integers(0, 10, args.labeled_batch)),
           'student_unlabeled': images(args.unlabeled_batch),
           'teacher_unlabeled': images(args.unlabeled_batch)}
  step = lambda: ref.train_step(student, teacher, optimizer, batch, 1, hparams,  # pylint: disable=unnecessary-lambda-assignment
                                torch.bfloat16 if mixed else None)
  step()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  load = os.getloadavg()[0]
  sys.stdout.flush()
  pid = os.getpid()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(args.steps):
      step()
  if os.getpid() != pid:  # A process the profiler forked returns here too: it prints nothing.
    os._exit(0)  # pylint: disable=protected-access
  by_class, other = collections.Counter(), collections.Counter()
  for event in prof.events():
    names, parent = [event.name], event.cpu_parent
    while parent is not None:
      names.append(parent.name)
      parent = parent.cpu_parent
    op_class = _torch_class(names)
    by_class[op_class] += event.self_cpu_time_total / 1e6
    if op_class.startswith('other'):
      other[' < '.join(names[:3])] += event.self_cpu_time_total / 1e6
  print(f'PyTorch {torch.__version__}, {args.dtype}{" + channels_last" if mixed else ""}, '
        f'{args.torch_threads} threads, width {args.width}, batch '
        f'{args.labeled_batch}+{args.unlabeled_batch}; untraced step min {1e3 * min(times):.1f} '
        f'ms, median {1e3 * sorted(times)[len(times) // 2]:.1f} ms; 1-min load average {load:.2f}')
  _print_table('  by op class (self time of every op, inside its innermost named range):',
               by_class, args.steps, min(times))
  if args.top:
    print('  the costliest ops in "other":')
    for names, seconds in other.most_common(args.top):
      print(f'    {1e3 * seconds / args.steps:9.1f} ms/step  {names[:150]}')
  sys.stdout.flush()


def main(argv=None) -> None:
  args = _args(argv)
  if args.framework == 'jax':
    run_jax(args)
    return
  if args.framework == 'torch':
    run_torch(args)
    return
  for framework in ('jax', 'torch'):
    argv_child = list(argv if argv is not None else sys.argv[1:])
    subprocess.run([sys.executable, '-m', 'benchmarks.cpu_profile', *argv_child,
                    '--framework', framework], check=False,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.stdout.flush()


if __name__ == '__main__':
  main()
