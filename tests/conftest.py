"""Simulate 8 devices on the CPU before JAX initialises.

No global matmul precision: certify_dataset must force 'highest' itself (test_certify checks
that it does), and a test that needs exact float32 products asks for them in its own scope.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
