"""wmh-jax: white matter hyperintensity volume from FLAIR MRI with JAX/Flax."""

__version__ = "0.1.0"
