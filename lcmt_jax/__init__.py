"""lcmt_jax: Local Clustering with Mean Teacher (arXiv 2004.09665) in JAX and Flax."""
