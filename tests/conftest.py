"""Test set-up: four forced CPU devices so sharding is exercised without accelerators.

The flag must be set before jax is first imported, which is why it lives here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
