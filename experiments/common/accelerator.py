"""``--accelerator``: the one backend a run uses, checked before anything runs."""

from __future__ import annotations

import sys

import jax

ACCELERATORS = ("cpu", "gpu", "tpu")
_HINTS = {"gpu": "install jax with CUDA support (pip install -U 'jax[cuda12]') on a machine "
                 "with an NVIDIA GPU",
          "tpu": "run on a Cloud TPU VM with pip install -U 'jax[tpu]'",
          "cpu": "unset JAX_PLATFORMS"}


def require_accelerator(name: str) -> None:
  """Exit at once, with the reason, unless JAX's default backend is ``name`` (``cpu`` keeps
  JAX on the CPU; ``gpu`` and ``tpu`` must be what JAX picks by itself; never a fallback)."""
  if name == "cpu":
    jax.config.update("jax_platforms", "cpu")
  try:
    found, reason = jax.default_backend(), f"JAX's devices are {jax.devices()}"
  except RuntimeError as e:
    found, reason = None, str(e)
  if found != name:
    sys.exit(f"error: --accelerator={name} was requested but JAX cannot use a {name}: "
             f"{reason}. To fix: {_HINTS[name]}, or choose another --accelerator. Not "
             f"falling back.")
