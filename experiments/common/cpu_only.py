"""``--accelerator=cpu`` applied before JAX is imported (this module imports nothing of it)."""

import os
from collections.abc import Sequence


def keep_jax_on_cpu_if_asked(argv: Sequence[str]) -> None:
  """Set ``JAX_PLATFORMS=cpu`` when ``argv`` holds ``--accelerator=cpu``, so that no other
  backend (libtpu, CUDA) is probed and none prints its start-up messages. Call it in a
  ``__main__`` before anything imports jax."""
  argv = list(argv)
  if "--accelerator=cpu" in argv or any(
      a == "--accelerator" and b == "cpu" for a, b in zip(argv, argv[1:])):
    os.environ["JAX_PLATFORMS"] = "cpu"
