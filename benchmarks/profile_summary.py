"""Where a compiled training call spends its device time, from a profiler trace and its HLO.

    python -m benchmarks.profile_summary DIR --steps N

`DIR` holds what `benchmarks.throughput --profile DIR` writes: a `jax.profiler`
trace of one compiled call of N training steps (`perfetto_trace.json.gz`) and
that call's optimised HLO (`hlo.txt`). Every kernel in the trace (every XLA
thunk on the CPU) names its HLO instruction; the HLO says what the instruction
computes (a convolution, a fusion and the ops inside it, a copy) and, through
the named scopes of `train_state.train_step`, which part of the step it
belongs to. The report gives device time per step by part, by kind of work,
and the instructions that take the most.
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
  root_op_names = {}
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
      instructions[name] = instruction
      if current:
        computations[current].add(instruction.opcode)
        if line.lstrip().startswith('ROOT') or current not in root_op_names:
          root_op_names[current] = instruction.op_name or root_op_names.get(current, '')
      continue
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(1)
  for instruction in instructions.values():
    if not instruction.op_name and instruction.called:
      instruction.op_name = root_op_names.get(instruction.called, '')
  return instructions, computations


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
  return [e for e in complete if 'hlo_op' in e.get('args', {})], False


def _instruction_of(event: dict, instructions: dict[str, Instruction]):
  """The HLO instruction a kernel ran for.

  A kernel launched from an XLA command buffer (a CUDA graph) names the buffer as
  its `hlo_op`; its own name is the fusion's, with `_N` where the HLO has `.N`,
  and a sub-kernel suffix where one instruction takes several kernels (`sort_49_1`).
  """
  name = event.get('args', {}).get('hlo_op') or event['name']
  if name in instructions or not name.startswith('command_buffer'):
    return name, instructions.get(name)
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
  by_part, by_kind, by_op = (collections.Counter() for _ in range(3))
  op_kinds = {}
  for event in events:
    name, instruction = _instruction_of(event, instructions)
    kind = kind_of(instruction, computations, event['name'])
    microseconds = float(event['dur'])
    by_part[part_of(instruction)] += microseconds
    by_kind[kind] += microseconds
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
