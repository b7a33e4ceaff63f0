"""Reference implementations and speed baselines used to check lcmt_jax."""
