"""``python -m experiments.cifar``: see :mod:`experiments.cifar.main`."""

import os
import sys

# --accelerator=cpu keeps JAX on the CPU before it initialises: no other backend (libtpu,
# CUDA) is probed, so none prints its start-up messages.
_argv = sys.argv[1:]
if "--accelerator=cpu" in _argv or any(
    a == "--accelerator" and b == "cpu" for a, b in zip(_argv, _argv[1:])):
  os.environ["JAX_PLATFORMS"] = "cpu"

from experiments.cifar.main import main  # noqa: E402  (after the environment above)

main()
