"""XLA:CPU workarounds, kept apart from the model: flags, compile options, gradient kernels.

- `configure(compute_dtype)` is the one explicit set-up call: `train.py`,
  `lcmt_jax.evaluate`, the benchmarks and the test suite make it before JAX
  starts. Importing `lcmt_jax` changes nothing.
- `compiler_options()` gives the options the trainer's programs compile with.
- `kernels` holds the convolution and max-pool with gradients in forms XLA:CPU
  runs fast; the model reaches them only through `lcmt_jax.ops`, which picks
  them on the CPU.
"""

from lcmt_jax.xla_cpu.flags import compiler_options
from lcmt_jax.xla_cpu.flags import configure

__all__ = ['compiler_options', 'configure']
