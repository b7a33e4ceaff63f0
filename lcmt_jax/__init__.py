"""lcmt_jax: Local Clustering with Mean Teacher (arXiv 2004.09665) in JAX and Flax."""

# XLA reads its flags when JAX starts a backend, so the CPU flags go first.
from lcmt_jax import cpu_flags  # pylint: disable=unused-import
