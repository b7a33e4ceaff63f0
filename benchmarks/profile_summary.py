"""Where a compiled training call spends its device time, from a profiler trace and its HLO.

    python -m benchmarks.profile_summary DIR --steps N

`DIR` holds what `benchmarks.throughput --profile DIR` writes: a `jax.profiler`
trace of one compiled call of N training steps (`perfetto_trace.json.gz`) and
that call's optimised HLO (`hlo.txt`). Every kernel in the trace (every XLA
thunk on the CPU) names its HLO instruction; the HLO says what the instruction
computes (a convolution, a fusion and the ops inside it, a copy) and, through
the named scopes of `train_state.train_step`, which part of the step it
belongs to. The report gives device time per step by part, by kind of work,
by op class of the network (`op_class_of`: convolution forward, input and
kernel gradients, weight norm, batch norm, max-pool, dropout, ...), and the
instructions that take the most.

On the CPU, XLA:CPU runs a thunk asynchronously where it can (a convolution
on Eigen's thread pool, a loop fusion split over the cores): the trace has
one event where the thunk starts and an `end: NAME` event where it completes.
A thunk's time is from its start to its end; thunks that overlap each count
in full ("thunk time", which can exceed the wall time), and the `wall`
column shares each moment of the step equally among the thunks running then,
so that it adds up to the wall time the thunks span.
"""

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys

# Named scopes of the step (lcmt_jax/trainer.py, train_state.py, models.py), the
# innermost listed first: a weight-norm op inside the teacher's pass is weight norm.
PARTS = ('sample_batch', 'local_clustering', 'weight_norm', 'ema_update', 'optimizer',
         'teacher_forward', 'student')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$')
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$')


@dataclasses.dataclass
class Instruction:
  opcode: str
  op_name: str = ''
  target: str = ''  # A custom call's target, e.g. a cuDNN convolution.
  called: str = ''  # The computation a fusion calls.
  window: tuple[int, ...] = ()  # A convolution's (or reduce-window's) window size.
  operands: tuple[str, ...] = ()


def _opcode(rest: str) -> str:
  """The opcode after the result shape, which may be a parenthesised tuple."""
  if rest.startswith('('):
    depth = 0
    for i, char in enumerate(rest):
      depth += {'(': 1, ')': -1}.get(char, 0)
      if depth == 0:
        rest = rest[i + 1:]
        break
  else:
    rest = rest.split(' ', 1)[1] if ' ' in rest else ''
  return rest.strip().split('(', 1)[0]


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[str, set[str]]]:
  """Instructions by name, and the opcodes inside each computation.

  A fusion without metadata of its own takes the op_name of its computation's root.
  """
  instructions, computations, current = {}, collections.defaultdict(set), None
  root_op_names, any_op_names, windows = {}, {}, {}
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      name, rest = match.groups()
      instruction = Instruction(_opcode(rest))
      for field, pattern in (('op_name', r'op_name="([^"]*)"'),
                             ('target', r'custom_call_target="([^"]*)"'),
                             ('called', r'calls=%([\w.\-]+)')):
        found = re.search(pattern, rest)
        if found:
          setattr(instruction, field, found.group(1))
      if instruction.opcode in ('convolution', 'reduce-window'):
        found = re.search(r'window=\{size=([\dx]+)', rest)
        instruction.window = tuple(int(n) for n in found.group(1).split('x')) if found else (1,)
      instruction.operands = tuple(re.findall(r'%([\w.\-]+)', rest.split('calls=')[0].split(
          'metadata=')[0].split('to_apply=')[0]))
      instructions[name] = instruction
      if current:
        computations[current].add(instruction.opcode)
        if instruction.op_name and current not in any_op_names:
          any_op_names[current] = instruction.op_name
        if instruction.window:
          windows[current] = instruction.window
        if line.lstrip().startswith('ROOT') or current not in root_op_names:
          root_op_names[current] = instruction.op_name or root_op_names.get(current, '')
      continue
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(1)
  for instruction in instructions.values():
    if not instruction.op_name and instruction.called:
      # A fusion XLA made (a rewritten kernel gradient, a tree reduction) may have no
      # metadata at its root: then any op name inside it.
      instruction.op_name = (root_op_names.get(instruction.called)
                             or any_op_names.get(instruction.called, ''))
    if not instruction.window and instruction.called:
      instruction.window = windows.get(instruction.called, ())
  _inherit_op_names(instructions)
  return instructions, computations


def _inherit_op_names(instructions: dict[str, Instruction], depth: int = 8) -> None:
  """Names an instruction XLA created without metadata after its nearest named user.

  Rewrites such as the tree reduction of a batch mean or the expansion of a
  max-pool's `select_and_scatter` into index iotas, a variadic reduce-window
  and a scatter leave their new instructions unnamed; the value they feed says
  what they are for. Operands are the fallback.
  """
  users = collections.defaultdict(list)
  for name, instruction in instructions.items():
    for operand in instruction.operands:
      users[operand].append(name)
  named = {}
  for name, instruction in instructions.items():
    if instruction.op_name:
      continue
    frontier, seen = [name], {name}
    for _ in range(depth):
      frontier = [u for n in frontier for u in users.get(n, ()) if u not in seen]
      seen.update(frontier)
      found = next((instructions[u].op_name for u in frontier if instructions[u].op_name), '')
      if found:
        named[name] = found
        break
    else:
      named[name] = next((instructions[o].op_name for o in instruction.operands
                          if o in instructions and instructions[o].op_name), '')
  for name, op_name in named.items():
    instructions[name].op_name = op_name


def kind_of(instruction: Instruction | None, computations: dict[str, set[str]],
            kernel_name: str = '') -> str:
  """What the work is: convolution, matmul, sort, gather/scatter, copy, reduction, elementwise."""
  if instruction is None:
    return 'memcpy' if 'memcpy' in kernel_name.lower() else 'unattributed'
  ops = {instruction.opcode} | computations.get(instruction.called, set())
  target = instruction.target.lower()
  if 'convolution' in ops or 'conv' in target:
    return 'convolution'
  if 'dot' in ops or 'gemm' in target or 'matmul' in target:
    return 'matmul'
  if 'sort' in ops:
    return 'sort'
  if ops & {'gather', 'scatter', 'dynamic-slice', 'dynamic-update-slice'}:
    return 'gather/scatter'
  if ops <= {'copy', 'transpose', 'bitcast', 'parameter', 'tuple', 'get-tuple-element', 'fusion'}:
    return 'copy/transpose'
  if ops & {'reduce', 'reduce-window', 'select-and-scatter'}:
    return 'reduction'
  return 'elementwise'


def part_of(instruction: Instruction | None) -> str:
  """Which part of the step, from the named scopes in the instruction's op_name.

  Random-number generation counts as a part of its own, whichever scope draws.
  """
  if instruction is None:
    return 'unattributed'
  path = instruction.op_name.split('/')
  if any('threefry' in name or 'random_bits' in name for name in path):
    return 'random numbers'  # Dropout masks, crops, flips, shuffles: wherever drawn.
  for part in PARTS:
    if part in path:
      if part == 'student':
        return 'student backward' if 'transpose(' in instruction.op_name else 'student forward'
      return part
  return 'other'


OP_CLASSES = (
    'conv forward (student)', 'conv forward (teacher)', 'conv input grad', 'conv kernel grad',
    'weight norm', 'batch norm (mean-only)', 'leaky ReLU', 'max-pool + grad',
    'dropout + random bits', 'dense + pairwise matmuls', 'pairwise kernel (local clustering)',
    'losses', 'optimiser + EMA', 'copy/transpose', 'other')


# The last op-name component of the mean-only batch norm's own arithmetic: the
# batch mean, its subtraction, the bias, the running mean; and their transposes.
_BATCH_NORM_OPS = frozenset({'reduce_sum', 'div', 'sub', 'add', 'mean', 'add_any', 'neg',
                             'broadcast_in_dim', 'mul', 'convert_element_type'})


def op_class_of(instruction: Instruction | None, computations: dict[str, set[str]]) -> str:
  """What the work is for, by the network's op classes (`OP_CLASSES`).

  A convolution whose window is larger than 3 is a kernel gradient (XLA
  computes it as a convolution of the input with the output gradient over the
  whole image); otherwise one under `transpose(` is an input gradient.
  The rest goes by the named scopes and jitted functions in the op name.
  """
  if instruction is None:
    return 'other'
  ops = {instruction.opcode} | computations.get(instruction.called, set())
  path = instruction.op_name
  names = set(path.split('/'))
  if 'local_clustering' in path:
    return 'pairwise kernel (local clustering)'
  if 'optimizer' in names or 'ema_update' in names:
    return 'optimiser + EMA'
  # XLA:CPU turns 1x1 convolutions into dots: those count as convolutions too.
  if ('convolution' in ops or 'conv' in instruction.target.lower()
      or 'dot' in ops and ('conv_general_dilated' in path or names & {'input_grad', 'kernel_grad'})):
    if instruction.window and max(instruction.window) > 3:
      return 'conv kernel grad'
    if 'kernel_grad' in names:
      return 'conv kernel grad'
    if 'transpose(' in path or 'input_grad' in names:
      return 'conv input grad'
    return 'conv forward (teacher)' if 'teacher_forward' in names else 'conv forward (student)'
  if 'dot' in ops:
    return 'dense + pairwise matmuls'
  if (ops <= {'copy', 'transpose', 'bitcast', 'parameter', 'tuple', 'get-tuple-element', 'fusion'}
      or path.rsplit('/', 1)[-1] in ('transpose', 'copy')):
    return 'copy/transpose'
  if 'weight_norm' in names:
    return 'weight norm'
  if any(n in path for n in ('threefry', 'random_bits', '_uniform', 'Dropout', 'dropout')):
    return 'dropout + random bits'
  if (any(n in path for n in ('max_pool', 'reduce_window_max', 'select_and_scatter'))
      or ops & {'select-and-scatter', 'scatter'} and 'ConvLarge' in path
      or 'reduce-window' in ops and instruction.window[:3] == (1, 2, 2)):
    return 'max-pool + grad'
  if 'leaky_relu' in path:
    return 'leaky ReLU'
  if ('batch_norm' in names or 'ConvLarge' in path and ops & {'reduce', 'reduce-window'}
      or 'ConvLarge' in path and path.rsplit('/', 1)[-1] in _BATCH_NORM_OPS):
    return 'batch norm (mean-only)'
  if any(n in path for n in ('softmax', 'log_softmax', 'cross_entropy', 'consistency')):
    return 'losses'
  return 'other'


def _pair_async_ends(events: list[dict]) -> list[dict]:
  """XLA:CPU thunk events with `dur` from their start to their `end: NAME` event.

  Each start is paired with the first unclaimed end of the same name at or after it.
  """
  starts = collections.defaultdict(list)
  ends = collections.defaultdict(list)
  for event in events:
    if event['name'].startswith('end: '):
      ends[event['name'][5:]].append(event)
    elif 'hlo_op' in event.get('args', {}):
      starts[event['name']].append(event)
  paired = []
  for name, started in starts.items():
    finished = sorted(ends.get(name, []), key=lambda e: e['ts'])
    j = 0
    for event in sorted(started, key=lambda e: e['ts']):
      while j < len(finished) and finished[j]['ts'] < event['ts']:
        j += 1
      end = event['ts'] + event['dur']
      if j < len(finished):
        end = max(end, finished[j]['ts'] + finished[j]['dur'])
        j += 1
      paired.append({**event, 'dur': end - event['ts']})
  return paired


def wall_shares(events: list[dict]) -> list[float]:
  """Each event's share of the wall time: every moment split equally among the events running."""
  boundaries = []
  for i, event in enumerate(events):
    boundaries.append((event['ts'], 1, i))
    boundaries.append((event['ts'] + event['dur'], -1, i))
  boundaries.sort(key=lambda b: (b[0], b[1]))
  shares = [0.0] * len(events)
  active, last = set(), None
  for time, sign, i in boundaries:
    if active and last is not None and time > last:
      part = (time - last) / len(active)
      for j in active:
        shares[j] += part
    last = time
    if sign > 0:
      active.add(i)
    else:
      active.discard(i)
  return shares


def device_events(trace_path: str) -> tuple[list[dict], bool]:
  """Complete events that name an HLO op: the device's where the trace has a device, else all."""
  with gzip.open(trace_path) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  process_names = {e['pid']: e.get('args', {}).get('name', '') for e in events
                   if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  device_pids = {pid for pid, name in process_names.items()
                 if name.startswith('/device:') and 'CPU' not in name or 'GPU' in name}
  complete = [e for e in events if e.get('ph') == 'X' and e.get('dur') is not None]
  thread_names = {(e['pid'], e['tid']): e.get('args', {}).get('name', '') for e in events
                  if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  counts = collections.Counter(
      f'{process_names.get(e["pid"], e["pid"])} / {thread_names.get((e["pid"], e["tid"]), e["tid"])}'
      for e in complete)
  print('trace lines (complete events):', dict(counts.most_common(12)), file=sys.stderr)
  if device_pids:
    device = [e for e in complete if e['pid'] in device_pids]
    # A device's trace has derived lines ("XLA Ops", "XLA Modules", "Steps") over its
    # streams' kernels; only the streams are counted.
    streams = [e for e in device if thread_names.get((e['pid'], e['tid']), '').startswith('Stream')]
    return streams or device, True
  return _pair_async_ends(complete), False


def _instruction_of(event: dict, instructions: dict[str, Instruction]):
  """The HLO instruction a kernel ran for.

  A kernel launched from an XLA command buffer (a CUDA graph) names the buffer as
  its `hlo_op`; its own name is the fusion's, with `_N` where the HLO has `.N`,
  and a sub-kernel suffix where one instruction takes several kernels (`sort_49_1`).
  XLA:CPU names a library call's thunk after the instruction and its target
  (`custom-call.3.clone__onednn$convolution`).
  """
  name = event.get('args', {}).get('hlo_op') or event['name']
  if name in instructions:
    return name, instructions[name]
  if not name.startswith('command_buffer'):
    instruction = name.split('__', 1)[0]
    return (instruction, instructions[instruction]) if instruction in instructions else (name, None)
  kernel = event['name']
  for candidate in (kernel, re.sub(r'_(\d+)$', r'.\1', kernel),
                    re.sub(r'_(\d+)_\d+$', r'.\1', kernel), re.sub(r'_\d+$', '', kernel)):
    if candidate in instructions:
      return candidate, instructions[candidate]
  return kernel, None


def summarize(directory: str, steps: int, top: int = 15) -> str:
  """The report: device time per step by part, by kind, and the top instructions."""
  traces = sorted(glob.glob(os.path.join(directory, '**', 'perfetto_trace.json.gz'),
                           recursive=True), key=os.path.getmtime)
  if not traces:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {directory}')
  trace_path = traces[-1]
  with open(os.path.join(directory, 'hlo.txt')) as f:
    instructions, computations = parse_hlo(f.read())
  events, on_device = device_events(trace_path)
  by_part, by_kind, by_op, by_class, wall_by_class = (collections.Counter() for _ in range(5))
  op_kinds = {}
  shares = wall_shares(events) if not on_device else [0.0] * len(events)
  for event, share in zip(events, shares):
    name, instruction = _instruction_of(event, instructions)
    kind = kind_of(instruction, computations, event['name'])
    op_class = op_class_of(instruction, computations)
    microseconds = float(event['dur'])
    by_part[part_of(instruction)] += microseconds
    by_kind[kind] += microseconds
    by_class[op_class] += microseconds
    wall_by_class[op_class] += share
    by_op[name] += microseconds
    op_kinds[name] = (kind, part_of(instruction))
  total = sum(by_kind.values())
  span = (max(e['ts'] + e['dur'] for e in events) - min(e['ts'] for e in events)) if events else 0
  lines = [f'{"device kernels" if on_device else "XLA thunks (no device in the trace)"}: '
           f'{total / steps / 1e3:.3f} ms busy per step over {steps} steps; first start to last '
           f'end {span / steps / 1e3:.3f} ms per step ({100 * total / max(span, 1e-9):.0f}% busy)']
  for title, counter in (('by part of the step', by_part), ('by kind of work', by_kind)):
    lines.append(f'  {title}:')
    lines += [f'    {name:22} {us / steps / 1e3:8.3f} ms/step {100 * us / total:5.1f}%'
              for name, us in counter.most_common()]
  lines.append('  by op class' + ('' if on_device else ' (thunk time; wall: each moment split '
                                   'among the thunks running)') + ':')
  wall_total = sum(wall_by_class.values())
  for name, us in by_class.most_common():
    wall = ('' if on_device else f'  wall {wall_by_class[name] / steps / 1e3:9.3f} ms/step '
            f'{100 * wall_by_class[name] / max(wall_total, 1e-9):5.1f}%')
    lines.append(f'    {name:36} {us / steps / 1e3:9.3f} ms/step {100 * us / total:5.1f}%{wall}')
  lines.append(f'  top {top} instructions:')
  lines += [f'    {name[:40]:40} {op_kinds[name][0]:15} {op_kinds[name][1]:17} '
            f'{us / steps / 1e3:8.3f} ms/step {100 * us / total:5.1f}%'
            for name, us in by_op.most_common(top)]
  return '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('directory')
  parser.add_argument('--steps', type=int, required=True, help='training steps in the traced call')
  args = parser.parse_args(argv)
  print(summarize(args.directory, args.steps))


if __name__ == '__main__':
  main()
