"""maxsq_jax: domain adaptation for semantic segmentation with the maximum squares loss (JAX/Flax)."""

__version__ = "0.1.0"
