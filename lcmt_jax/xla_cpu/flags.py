"""The XLA flags and compile options this model needs on the CPU, set by one explicit call.

    from lcmt_jax import xla_cpu
    xla_cpu.configure(config.compute_dtype)  # Before anything creates a JAX array.

`configure` adds to `XLA_FLAGS`

    --xla_cpu_experimental_ynn_fusion_type=-individual_convolution

XLA:CPU (jaxlib 0.10) hands every convolution to YNNPACK by default, which
runs ConvLarge's convolutions 2-3x slower than XLA's Eigen convolutions and
its kernel gradients 3-6x slower (BENCHMARKS.md, "XLA:CPU flags"). The `-`
removes only the convolutions from YNNPACK's default list; its reductions
(the batch-norm means), which beat XLA's own loops 20x, stay. For a bfloat16
run it also adds `--xla_cpu_experimental_onednn_custom_call=true`: jaxlib
0.11 then runs bf16 convolutions as oneDNN calls on AMX units (a width-32
bf16 step 2.3x faster), while the same flag makes float32 steps slower, so
float32 runs never get it. GPU compilations ignore both.

A flag is not added when `XLA_FLAGS` already names it (the user's choice
wins), when `LCMT_XLA_CPU_FLAGS=0` is in the environment, or when the
installed jaxlib does not know the flag or its value (XLA aborts the process
on an unknown flag, so each is looked up in jaxlib's shared library first:
`jaxlib_has_flag`, `jaxlib_defines`). XLA reads its flags when JAX creates
its backends: a call after that has no effect.

`compiler_options()` gives the options the trainer's jitted programs are
compiled with: LLVM at `-O2` instead of XLA's default `-O3` on the CPU. The
quickstart's programs then compile in about 60% of the time and run as fast
(BENCHMARKS.md, "Compile time"). A value of `xla_backend_optimization_level`
in `XLA_FLAGS`, `LCMT_XLA_CPU_FLAGS=0` or an accelerator backend keeps XLA's
default; `jax_disable_most_optimizations` (the test suite) wins over it.
"""

import importlib.util
import mmap
import os

FLAG = 'xla_cpu_experimental_ynn_fusion_type'
VALUE = '-individual_convolution'
BF16_FLAG = 'xla_cpu_experimental_onednn_custom_call'
BF16_VALUE = 'true'
# LLVM's level for the trainer's programs on the CPU (`compiler_options`).
OPT_LEVEL_OPTION = 'xla_backend_optimization_level'
OPT_LEVEL = 2
# The fusion type VALUE names, which the installed jaxlib must define for FLAG=VALUE to parse.
_FUSION_TYPE = b'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'
_OPT_OUT = 'LCMT_XLA_CPU_FLAGS'


def jaxlib_knows_flag() -> bool:
  """Whether jaxlib's XLA library defines FLAG and the fusion type VALUE names."""
  return jaxlib_has_flag(FLAG) and jaxlib_defines(_FUSION_TYPE)


def jaxlib_has_flag(name: str) -> bool:
  """Whether jaxlib's XLA accepts `--name` in XLA_FLAGS.

  XLA registers each flag under its name as a C string, NUL on both sides in
  the library. A removed flag's name can stay in the DebugOptions descriptor
  as a reserved field name, without the NULs (`xla_cpu_use_fusion_emitters`
  in jaxlib 0.11), and XLA aborts on it.
  """
  return jaxlib_defines(b'\0' + name.encode() + b'\0')


def jaxlib_defines(*names: bytes) -> bool:
  """Whether jaxlib's XLA library holds every one of `names` (flag names, enum values)."""
  spec = importlib.util.find_spec('jaxlib')
  if spec is None or not spec.submodule_search_locations:
    return False
  directory = list(spec.submodule_search_locations)[0]
  for name in ('libjax_common.so', 'xla_extension.so', 'libjax_common.dylib'):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      continue
    try:
      with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return all(data.find(name) >= 0 for name in names)
    except (OSError, ValueError):
      return False
  return False


def configure(compute_dtype: str = 'float32') -> list[str]:
  """Adds the flags a run computing in `compute_dtype` needs (module docstring); returns them.

  Call it before JAX creates its backends, once the run's compute dtype is known.
  """
  added = []
  if jaxlib_knows_flag() and _add_flag(FLAG, VALUE):
    added.append(f'--{FLAG}={VALUE}')
  if compute_dtype == 'bfloat16' and jaxlib_has_flag(BF16_FLAG) and _add_flag(BF16_FLAG, BF16_VALUE):
    added.append(f'--{BF16_FLAG}={BF16_VALUE}')
  return added


def compiler_options() -> dict[str, int] | None:
  """`jax.jit`'s `compiler_options` for the trainer's programs (module docstring); None: XLA's.

  XLA:CPU's default level 3 costs compile time without making ConvLarge's
  programs faster: at level 2 the quickstart's state initialisation compiles
  in 3.7 s instead of 6.6 s and its epoch in 7.0 s instead of 10.4 s, and an
  epoch takes as long. Values differ from level 3's in float32 rounding, as
  they do between jaxlib versions. Call it where the program is jitted: it
  reads JAX's config as it is then.
  """
  import jax  # pylint: disable=import-outside-toplevel

  if (_opted_out() or OPT_LEVEL_OPTION in os.environ.get('XLA_FLAGS', '')
      or jax.config.read('jax_disable_most_optimizations')  # Level 0, which this would override.
      or jax.default_backend() != 'cpu'):
    return None
  return {OPT_LEVEL_OPTION: OPT_LEVEL}


def _opted_out() -> bool:
  return os.environ.get(_OPT_OUT, '1') == '0'


def _add_flag(flag: str, value: str) -> bool:
  """Appends `--flag=value` to `XLA_FLAGS` unless the user set the flag or opted out."""
  current = os.environ.get('XLA_FLAGS', '')
  if _opted_out() or flag in current:
    return False
  os.environ['XLA_FLAGS'] = f'{current} --{flag}={value}'.strip()
  return True

