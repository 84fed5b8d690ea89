"""Pallas kernels for soljax, each beside a pure-JAX reference with the same signature."""
