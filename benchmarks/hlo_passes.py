"""Passes over the activations in one training step, counted in the optimised HLO.

    python -m benchmarks.hlo_passes --width 128 --dtype bfloat16

The GPU profile (BENCHMARKS.md, "Where the GPU step's time goes") puts half
the step in memory traffic around the convolutions: the mean-only batch
norm's mean and its gradient, leaky ReLU, dropout, max-pool backward. This
counts that traffic without a profiler: it compiles the scanned training
call of `experiment.make_train_fn` for the backend JAX runs on, reads the
optimised HLO (`.lower(...).compile().as_text()`), takes the scan's body as
one step, and lists every kernel of it (a fusion, a convolution, a copy, a
custom call; a loop's kernels once per iteration) that reads or writes an
activation-sized tensor: a conv layer's or pool's output, its gradient, or a
copy of either in another layout, in any dtype.

Each kernel is placed by its op_name (JAX's named scopes survive into XLA's
metadata): the phase (student forward, teacher forward, student backward,
other) and the layer (`conv1a` .. `conv3c`, `dense`, or the ConvLarge-level
op outside the layers: `leaky_relu`, `Dropout_0`, `max_pool`); a fusion takes
the layer of its root, or of the first op inside it that has one. Its `ops`
are the model's named scopes found inside it (batch_norm, leaky_relu, dropout,
max_pool, weight_norm, the convolution's input_grad / kernel_grad), which say
what XLA fused together. "Passes" count activation-sized reads and writes:
a fusion that reads two activations and writes one is three passes over
memory. Bytes are those passes' tensor sizes, as the HLO shapes give them.

The counting (`parse_module`, `step_kernels`, `summarize`) is pure over HLO
text, so it reads XLA:CPU's HLO here and XLA:GPU's (cuDNN convolutions as
custom calls, command buffers as calls) the same way.
"""

import argparse
import collections
import dataclasses
import functools
import math
import re
import sys
from collections.abc import Callable, Iterable

DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
               's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
               'f8e4m3fn': 1, 'f8e5m2': 1}
KINDS = ('convolution', 'reduction', 'elementwise', 'copy/transpose', 'custom-call', 'matmul',
         'other')
PHASES = ('student fwd', 'teacher fwd', 'student bwd', 'other')
# Named scopes of the model and ops (models/convlarge.py, xla_cpu/kernels.py, Flax) that say
# what a kernel computes; `dropout` also covers its random bits.
OP_TAGS = (('conv_general_dilated', 'conv'), ('input_grad', 'conv'), ('kernel_grad', 'conv'),
           ('batch_norm', 'batch_norm'), ('leaky_relu', 'leaky_relu'), ('Dropout_', 'dropout'),
           ('max_pool', 'max_pool'), ('weight_norm', 'weight_norm'))
# Free: no kernel of their own (views, tuples, loop and call plumbing).
_FREE = frozenset({'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant',
                   'after-all', 'add-dependency', 'opt-barrier', 'partition-id', 'replica-id'})
_HEADER = re.compile(r'^\s*(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$')
_SHAPE = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]')
_LAYER = re.compile(r'/(conv\d[a-z]|dense)/')


@dataclasses.dataclass(frozen=True)
class Tensor:
  dtype: str
  dims: tuple[int, ...]

  @property
  def bytes(self) -> int:
    return math.prod(self.dims) * DTYPE_BYTES.get(self.dtype, 4)


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  opcode: str
  shapes: tuple[Tensor, ...]  # One per element of a tuple-shaped result.
  operands: tuple[str, ...]
  called: tuple[str, ...]  # Fused, loop, call or branch computations.
  op_name: str = ''
  target: str = ''  # A custom call's target.
  trip_count: int = 1  # A while loop's known trip count.


@dataclasses.dataclass(frozen=True)
class Module:
  computations: dict[str, list[Instruction]]
  entry: str

  @functools.cached_property
  def by_name(self) -> dict[str, Instruction]:
    return {i.name: i for body in self.computations.values() for i in body}


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One kernel of the step that reads or writes an activation-sized tensor."""
  name: str
  kind: str
  phase: str
  layer: str
  ops: tuple[str, ...]
  reads: tuple[Tensor, ...]
  writes: tuple[Tensor, ...]
  repeats: int = 1  # Runs per step (inside a loop of known trip count).

  @property
  def passes(self) -> int:
    return self.repeats * (len(self.reads) + len(self.writes))

  @property
  def bytes(self) -> int:
    return self.repeats * sum(t.bytes for t in self.reads + self.writes)


def _split_result(rest: str) -> tuple[str, str]:
  """The result shape and what follows it; the shape may be a parenthesised tuple."""
  if rest.startswith('('):
    depth = 0
    for i, char in enumerate(rest):
      depth += {'(': 1, ')': -1}.get(char, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].strip()
  shape, _, tail = rest.partition(' ')
  return shape, tail.strip()


def _operand_text(tail: str) -> tuple[str, str]:
  """The text inside the opcode's parentheses, and the attributes after them."""
  start = tail.find('(')
  depth = 0
  for i in range(start, len(tail)):
    depth += {'(': 1, ')': -1}.get(tail[i], 0)
    if depth == 0:
      return tail[start + 1:i], tail[i + 1:]
  return tail[start + 1:], ''


def parse_instruction(line: str) -> Instruction | None:
  """One HLO instruction line, or None for anything else."""
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  name, rest = match.groups()
  shape_text, tail = _split_result(rest)
  opcode = tail.split('(', 1)[0].strip()
  operand_text, attributes = _operand_text(tail)
  called = re.findall(r'(?:calls|to_apply|body|condition)=%?([\w.\-]+)', attributes)
  branches = re.search(r'branch_computations=\{([^}]*)\}', attributes)
  if branches:
    called += re.findall(r'%?([\w.\-]+)', branches.group(1))
  op_name = re.search(r'op_name="([^"]*)"', attributes)
  target = re.search(r'custom_call_target="([^"]*)"', attributes)
  trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attributes)
  return Instruction(
      name=name, opcode=opcode,
      shapes=tuple(Tensor(d, tuple(int(n) for n in dims.split(',') if n))
                   for d, dims in _SHAPE.findall(shape_text)),
      operands=tuple(re.findall(r'%([\w.\-]+)', operand_text)), called=tuple(called),
      op_name=op_name.group(1) if op_name else '', target=target.group(1) if target else '',
      trip_count=int(trips.group(1)) if trips else 1)


def parse_module(text: str) -> Module:
  """The computations of an HLO module's text, each a list of its instructions."""
  computations, current, entry = {}, None, ''
  for line in text.splitlines():
    instruction = parse_instruction(line) if current else None
    if instruction:
      computations[current].append(instruction)
      continue
    header = _HEADER.match(line)
    if header and '=' not in line.split('(', 1)[0]:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
  if not entry:
    raise ValueError('no ENTRY computation in the HLO text')
  return Module(computations, entry)


def _inner_instructions(module: Module, instruction: Instruction) -> list[Instruction]:
  """The instruction and every instruction of the computations it fuses, transitively."""
  found, stack, seen = [instruction], list(instruction.called), set()
  while stack:
    name = stack.pop()
    if name in seen or name not in module.computations:
      continue
    seen.add(name)
    for inner in module.computations[name]:
      found.append(inner)
      stack.extend(inner.called)
  return found


def kind_of(module: Module, instruction: Instruction) -> str:
  """Convolution, reduction, elementwise, copy/transpose, custom-call, matmul or other."""
  inner = _inner_instructions(module, instruction)
  ops = {i.opcode for i in inner}
  targets = ' '.join(i.target.lower() for i in inner)
  if 'convolution' in ops or 'conv' in targets:
    return 'convolution'
  if 'dot' in ops or 'gemm' in targets or 'matmul' in targets:
    # XLA rewrites a 1x1 convolution into a dot; its op_name still names the convolution.
    return 'convolution' if 'conv_general_dilated' in instruction.op_name else 'matmul'
  if instruction.opcode == 'custom-call':
    return 'custom-call'
  if ops & {'reduce', 'reduce-window', 'select-and-scatter', 'scatter'}:
    return 'reduction'
  if ops <= {'copy', 'transpose', 'bitcast', 'parameter', 'tuple', 'get-tuple-element',
             'fusion', 'reshape', 'copy-start', 'copy-done'}:
    return 'copy/transpose'
  if instruction.opcode in ('fusion', 'add', 'multiply', 'subtract', 'select', 'convert',
                            'maximum', 'compare', 'broadcast', 'divide'):
    return 'elementwise'
  return 'other'


def phase_of(op_name: str) -> str:
  """Which pass of the step, from the named scopes of `train_state.train_step`."""
  path = op_name.split('/')
  if 'teacher_forward' in path:
    return 'teacher fwd'
  if 'student' in path:
    return 'student bwd' if 'transpose(' in op_name else 'student fwd'
  return 'other'


def layer_of(op_names: Iterable[str]) -> str:
  """The conv layer of the first op_name that names one, else the ConvLarge-level op."""
  op_names = [n for n in op_names if n]
  for op_name in op_names:
    found = _LAYER.search(op_name)
    if found:
      return found.group(1)
  for op_name in op_names:
    path = op_name.split('/')
    for i, part in enumerate(path[:-1]):
      if part.rstrip(')').endswith('ConvLarge'):
        return re.sub(r'^jit\((.*)\)$', r'\1', path[i + 1])
  return 'other'


def _tag_ops(op_names: Iterable[str]) -> tuple[str, ...]:
  tags = {tag for op_name in op_names for key, tag in OP_TAGS if key in op_name}
  return tuple(sorted(tags))


def _kernel_instructions(module: Module, computation: str, repeats: int = 1,
                         context: str = '') -> Iterable[tuple[Instruction, int, str]]:
  """The instructions of `computation` that run as kernels, loops and calls expanded.

  Each comes with its runs per step and the op_name of its innermost enclosing
  loop or call that has one: XLA leaves the copies of a loop's state unnamed.
  """
  for instruction in module.computations[computation]:
    if instruction.opcode in ('while', 'call', 'conditional', 'async-start'):
      trips = instruction.trip_count if instruction.opcode == 'while' else 1
      for called in instruction.called:  # A loop's condition and body both run each iteration.
        if called in module.computations:
          yield from _kernel_instructions(module, called, repeats * trips,
                                          instruction.op_name or context)
    elif instruction.opcode not in _FREE and not instruction.opcode.endswith('-done'):
      yield instruction, repeats, context


def _convolutions_in(module: Module, computation: str) -> int:
  return sum(kind_of(module, i) == 'convolution'
             for i, _, _ in _kernel_instructions(module, computation))


def step_computation(module: Module) -> str:
  """The scan's body: the while body (reached from ENTRY) with the most convolutions.

  A call of one step has no scan: then the ENTRY computation itself.
  """
  best, best_count = module.entry, 0
  stack = [module.entry]
  while stack:
    for instruction in module.computations[stack.pop()]:
      if instruction.opcode == 'call':
        stack.extend(c for c in instruction.called if c in module.computations)
      if instruction.opcode == 'while':
        for called in instruction.called:
          count = _convolutions_in(module, called)
          if count > best_count:
            best, best_count = called, count
  return best


def step_kernels(module: Module, is_activation: Callable[[Tensor], bool]) -> list[Kernel]:
  """Every kernel of one step that reads or writes an activation-sized tensor."""
  by_name = module.by_name
  kernels = []
  for instruction, repeats, context in _kernel_instructions(module, step_computation(module)):
    reads = tuple(t for operand in dict.fromkeys(instruction.operands) if operand in by_name
                  for t in by_name[operand].shapes if is_activation(t))
    writes = tuple(t for t in instruction.shapes if is_activation(t))
    if not reads and not writes:
      continue
    inner_names = [i.op_name for i in _inner_instructions(module, instruction)] + [context]
    kernels.append(Kernel(
        name=instruction.name, kind=kind_of(module, instruction),
        phase=phase_of(instruction.op_name or next((n for n in inner_names if n), '')),
        layer=layer_of(inner_names), ops=_tag_ops(inner_names), reads=reads, writes=writes,
        repeats=repeats))
  return kernels


@dataclasses.dataclass
class Tally:
  kernels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  reads: int = 0
  writes: int = 0
  bytes: int = 0

  def add(self, kernel: Kernel) -> None:
    self.kernels[kernel.kind] += kernel.repeats
    self.reads += kernel.repeats * len(kernel.reads)
    self.writes += kernel.repeats * len(kernel.writes)
    self.bytes += kernel.bytes


def summarize(kernels: Iterable[Kernel], key: Callable[[Kernel], tuple]) -> dict[tuple, Tally]:
  """Kernels, activation reads and writes, and bytes, grouped by `key`."""
  tallies = collections.defaultdict(Tally)
  for kernel in kernels:
    tallies[key(kernel)].add(kernel)
  return dict(tallies)


def format_table(tallies: dict[tuple, Tally], key_names: tuple[str, ...]) -> str:
  """One line per group: kernels by kind, passes (reads + writes) and MB moved."""
  widths = [max([len(n)] + [len(str(k[i])) for k in tallies]) for i, n in enumerate(key_names)]
  kinds = [k for k in KINDS if any(t.kernels[k] for t in tallies.values())]
  short = {'convolution': 'conv', 'reduction': 'reduce', 'elementwise': 'elem',
           'copy/transpose': 'copy', 'custom-call': 'cc', 'matmul': 'dot', 'other': 'other'}
  header = '  '.join(n.ljust(w) for n, w in zip(key_names, widths))
  lines = [header + ''.join(f'{short[k]:>7}' for k in kinds)
           + f'{"kernels":>8}{"reads":>7}{"writes":>7}{"passes":>7}{"MB":>9}']
  total = Tally()
  for key, tally in tallies.items():
    lines.append('  '.join(str(v).ljust(w) for v, w in zip(key, widths))
                 + ''.join(f'{tally.kernels[k]:>7}' for k in kinds)
                 + f'{sum(tally.kernels.values()):>8}{tally.reads:>7}{tally.writes:>7}'
                 f'{tally.reads + tally.writes:>7}{tally.bytes / 1e6:>9.1f}')
    total.kernels.update(tally.kernels)
    total.reads += tally.reads
    total.writes += tally.writes
    total.bytes += tally.bytes
  lines.append('  '.join(('total' if i == 0 else '').ljust(w) for i, w in enumerate(widths))
               + ''.join(f'{total.kernels[k]:>7}' for k in kinds)
               + f'{sum(total.kernels.values()):>8}{total.reads:>7}{total.writes:>7}'
               f'{total.reads + total.writes:>7}{total.bytes / 1e6:>9.1f}')
  return '\n'.join(lines)


# --- ConvLarge ----------------------------------------------------------------------------------

def convlarge_activation_sizes(width: int, batches: Iterable[int],
                               image_size: int = 32) -> frozenset[int]:
  """Element counts of ConvLarge's conv and pool outputs (models/convlarge.py) for each batch."""
  s, w = image_size, width
  outputs = [(s, w), (s // 2, w), (s // 2, 2 * w), (s // 4, 2 * w),
             (s // 4 - 2, 4 * w), (s // 4 - 2, 2 * w), (s // 4 - 2, w)]
  return frozenset(b * size * size * c for b in batches for size, c in outputs)


def activation_predicate(sizes: frozenset[int],
                         weight_shapes: Iterable[tuple[int, ...]]) -> Callable[[Tensor], bool]:
  """Whether a tensor is activation-sized: its element count is one of `sizes`.

  A weight of the same size (conv3a's kernel has as many elements as the
  unlabelled batch's conv3b output), in its own shape or with its axes
  permuted (the input gradient's flipped kernel), is not. A flattened 2-D
  form cannot be told apart from an activation by shape (conv1b's kernel as
  [1152, 128] is conv3c's labelled output as a matrix); XLA flattens only the
  1x1 convolutions, whose kernels are not activation-sized.
  """
  excluded = {tuple(sorted(shape)) for shape in weight_shapes}
  return lambda t: (len(t.dims) >= 2 and math.prod(t.dims) in sizes
                    and tuple(sorted(t.dims)) not in excluded)


def convlarge_weight_shapes(width: int, num_classes: int = 10) -> list[tuple[int, ...]]:
  """ConvLarge's kernel shapes (models/convlarge.py), to tell weights from activations."""
  w = width
  return [(3, 3, 3, w), (3, 3, w, w), (3, 3, w, 2 * w), (3, 3, 2 * w, 2 * w), (3, 3, 2 * w, 4 * w),
          (1, 1, 4 * w, 2 * w), (1, 1, 2 * w, w), (w, num_classes)]


def compiled_step_hlo(width: int, dtype: str, labeled_batch: int, unlabeled_batch: int) -> str:
  """The optimised HLO of a two-step scanned training call (`experiment.make_train_fn`)."""
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import common, throughput  # pylint: disable=import-outside-toplevel
  from lcmt_jax import experiment, input_pipeline  # pylint: disable=import-outside-toplevel
  args = throughput.parse_args(['--width', str(width), '--labeled_batch', str(labeled_batch),
                                '--unlabeled_batch', str(unlabeled_batch)])
  data = common.synthetic_data(2 * labeled_batch, 2 * unlabeled_batch)
  config, step_config, state = throughput.jax_setup(args, dtype, 2)
  mesh = experiment.make_mesh()
  run = experiment.make_train_fn(config, step_config, input_pipeline.DATASETS['cifar10'], mesh)
  device_data = jax.device_put(data, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  with throughput.matmul_precision(dtype):
    return run.lower(state, device_data, jax.random.key(1), num_steps=2).compile().as_text()


def report(text: str, is_activation: Callable[[Tensor], bool]) -> str:
  """The per-layer, per-ops and total tables of one step's HLO."""
  module = parse_module(text)
  kernels = step_kernels(module, is_activation)
  order = {p: i for i, p in enumerate(PHASES)}
  by_layer = summarize(sorted(kernels, key=lambda k: (order[k.phase], k.layer)),
                       lambda k: (k.phase, k.layer))
  by_ops = summarize(sorted(kernels, key=lambda k: (k.kind, k.ops)),
                     lambda k: (k.kind, '+'.join(k.ops) or '-'))
  by_phase = summarize(sorted(kernels, key=lambda k: order[k.phase]), lambda k: (k.phase,))
  return '\n\n'.join([
      f'step computation: {step_computation(module)}; {len(kernels)} kernels touch activations',
      'by phase and layer:\n' + format_table(by_layer, ('phase', 'layer')),
      'by kind and what is fused (named scopes inside the kernel):\n'
      + format_table(by_ops, ('kind', 'ops')),
      'totals per step:\n' + format_table(by_phase, ('phase',))])


# --- Candidate: the batch mean of a convolution from its input -----------------------------------

def mean_of_conv_from_input(x, w, padding: str):
  """The per-channel mean over batch and space of `conv2d(x, w, padding)`, from `x`'s window sums.

  The mean over output positions of a stride-1 convolution is `w` applied to
  the mean of each shifted window of the (zero-padded) input:
  `mean(conv(x, w))[o] = sum_{i,j,c} w[i,j,c,o] * mean_{n,p,q} xpad[n,p+i,q+j,c]`.
  The window means come from one reduction of `x` over the batch to
  `[H, W, C]` and a 3x3 window sum of that small array, so the centring of
  the convolution's output becomes a bias and no pass reads the output.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  kh, kw = w.shape[:2]
  per_position = jnp.sum(x, axis=0, dtype=jnp.float32)
  if padding == 'SAME':
    per_position = jnp.pad(per_position, (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
  out_h, out_w = per_position.shape[0] - kh + 1, per_position.shape[1] - kw + 1
  windows = jnp.stack([jnp.stack([per_position[i:i + out_h, j:j + out_w].sum((0, 1))
                                  for j in range(kw)]) for i in range(kh)])
  windows = windows / (x.shape[0] * out_h * out_w)
  return jnp.einsum('ijc,ijco->o', windows, w.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def layer_forms(padding: str = 'SAME'):
  """One ConvLarge layer's train-mode forward (conv, mean-only BN, leaky ReLU), in two forms.

  `plain` is what the model computes (`ops.conv2d`, `ops.subtract_batch_mean`);
  `from_input` takes the batch mean from the input (`mean_of_conv_from_input`).
  Each returns the output and the batch mean.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from lcmt_jax import ops  # pylint: disable=import-outside-toplevel

  def plain(x, w, b):
    out, mean = ops.subtract_batch_mean(ops.conv2d(x, w, padding), b)
    return jax.nn.leaky_relu(out, 0.1), mean

  def from_input(x, w, b):
    mean = mean_of_conv_from_input(x, w, padding)
    out = ops.conv2d(x, w, padding) + (b - mean).astype(x.dtype)
    return jax.nn.leaky_relu(out, 0.1), mean

  return {'plain': plain, 'from_input': from_input}


def candidate_report(batch: int, width: int, dtype: str, repeats: int) -> str:
  """conv1b's forward and backward in both forms: pass counts, agreement and CPU time."""
  import time  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = jnp.asarray(np.maximum(rng.normal(size=(batch, 32, 32, width)), -0.1), dtype)
  w = jnp.asarray(rng.normal(size=(3, 3, width, width)) / np.sqrt(9 * width), dtype)
  b = jnp.asarray(rng.normal(size=width), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(batch, 32, 32, width)), dtype)
  is_activation = activation_predicate(frozenset({batch * 32 * 32 * width}), [w.shape])
  lines, results = [], {}
  for name, form in layer_forms().items():
    def loss(x, w, b, form=form):
      out, mean = form(x, w, b)
      return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), (out, mean)
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    compiled = fn.lower(x, w, b).compile()
    kernels = step_kernels(parse_module(compiled.as_text()), is_activation)
    results[name] = jax.block_until_ready(compiled(x, w, b))
    start = time.perf_counter()
    for _ in range(repeats):
      jax.block_until_ready(compiled(x, w, b))
    seconds = (time.perf_counter() - start) / repeats
    tally = summarize(kernels, lambda k: ('total',))[('total',)]
    kinds = ', '.join(f'{k} {n}' for k, n in sorted(tally.kernels.items()))
    lines.append(f'{name:11} {tally.reads + tally.writes:3} passes ({tally.reads} reads, '
                 f'{tally.writes} writes, {tally.bytes / 1e6:.0f} MB) in {sum(tally.kernels.values())} '
                 f'kernels ({kinds}); forward + backward {1e3 * seconds:.1f} ms')
  (_, (out_p, mean_p)), grads_p = results['plain']
  (_, (out_c, mean_c)), grads_c = results['from_input']
  diff = lambda a, c: float(jnp.max(jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32))))  # pylint: disable=unnecessary-lambda-assignment
  scale = lambda a: float(jnp.max(jnp.abs(a.astype(jnp.float32))))  # pylint: disable=unnecessary-lambda-assignment
  for label, a, c in (('batch mean', mean_p, mean_c), ('output', out_p, out_c),
                      ('dx', grads_p[0], grads_c[0]), ('dW', grads_p[1], grads_c[1]),
                      ('db', grads_p[2], grads_c[2])):
    lines.append(f'  max |plain - from_input| {label:10} {diff(a, c):.3g} (max |plain| {scale(a):.3g})')
  return '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--width', type=int, default=128)
  parser.add_argument('--dtype', default='float32', help='float32, float32-highest or bfloat16')
  parser.add_argument('--labeled_batch', type=int, default=32)
  parser.add_argument('--unlabeled_batch', type=int, default=128)
  parser.add_argument('--hlo_out', default='', help='also write the HLO text to this file')
  parser.add_argument('--hlo_in', default='', help='count this HLO text instead of compiling')
  parser.add_argument('--candidate', action='store_true',
                      help='instead: conv1b alone, its batch mean from the output (the model) '
                           'and from the input, passes, agreement and time')
  parser.add_argument('--repeats', type=int, default=5, help='timed calls of each --candidate form')
  args = parser.parse_args(argv)
  if args.candidate:
    from lcmt_jax import xla_cpu  # pylint: disable=import-outside-toplevel
    xla_cpu.configure(args.dtype.split('-')[0])
    import jax  # pylint: disable=import-outside-toplevel
    print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), JAX {jax.__version__}, '
          f'conv1b at width {args.width}, batch {args.unlabeled_batch}, {args.dtype}')
    print(candidate_report(args.unlabeled_batch, args.width, args.dtype.split('-')[0], args.repeats))
    return
  sizes = convlarge_activation_sizes(args.width, (args.labeled_batch, args.unlabeled_batch))
  if args.hlo_in:
    with open(args.hlo_in) as f:
      text = f.read()
    header = f'HLO from {args.hlo_in}'
  else:
    from lcmt_jax import xla_cpu  # pylint: disable=import-outside-toplevel
    xla_cpu.configure(args.dtype.split('-')[0])  # Before JAX starts, as the trainer.
    import jax  # pylint: disable=import-outside-toplevel
    text = compiled_step_hlo(args.width, args.dtype, args.labeled_batch, args.unlabeled_batch)
    header = (f'{jax.devices()[0].device_kind} ({jax.default_backend()}), JAX {jax.__version__}, '
              f'width {args.width}, batch {args.labeled_batch}+{args.unlabeled_batch}, '
              f'{args.dtype}')
    if args.hlo_out:
      from lcmt_jax import files  # pylint: disable=import-outside-toplevel
      files.write_atomically(args.hlo_out, text.encode())
  print(header)
  print(report(text, activation_predicate(sizes, convlarge_weight_shapes(args.width))))


if __name__ == '__main__':
  main(sys.argv[1:])
