"""Simulate 8 devices on the CPU before JAX initialises, and use exact float32 matmuls."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
