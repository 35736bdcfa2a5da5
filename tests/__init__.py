"""maxsq_jax test suite (a package, so tests can import tests.* helper modules)."""
