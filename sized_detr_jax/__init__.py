"""sized_detr_jax: DINO-family detectors with the Sized L1 loss, in JAX/Flax."""

__version__ = "0.2.0"
