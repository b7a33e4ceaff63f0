"""Oracles and run helpers shared by the test suite and the benchmarks (neither imports the other).

- `torch_reference`: a clean-room PyTorch port of the reference (needs torch),
  the parity oracle of the tests and the speed baseline of the benchmarks.
- `runs`: the tiny run the tests and the kill soak train, and the check that
  two runs ended bit for bit alike.
"""
