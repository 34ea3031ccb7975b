"""Simulate 8 devices on the CPU before JAX initialises.

No global matmul precision: certify_dataset must force 'highest' itself (test_certify checks
that it does), and a test that needs exact float32 products asks for them in its own scope.
"""

import os

# pytest-xdist workers each load libtpu for the TPU compile tests; without this the second
# process to load it stops on libtpu's lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# CPU only, and said before JAX starts: the CUDA plugin (the gpu-compile extra) then compiles
# for H100 targets (test_compile_targets) instead of failing to find a GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_num_cpu_devices", 8)
